"""The paper's offline study, reproduced on the synthetic marketplace with the project's own stages.

`visrec.sim.study.run.run_study(StudyConfig)` generates a seeded marketplace (`visrec.sim.demo_data`),
takes the models (by default the stand-ins pretrained on the synthetic web corpus,
`visrec.sim.pretrain`, cached; tiny random ones with `pretrained=False`; the full SigLIP
ViT-B/16-256 architecture with `full_size`; or real checkpoints), and runs the real stages on it:
prepare -> train -> embed (fine-tuned SigLIP, the SigLIP it started from, MobileNetV2 baseline) -> PCA
variants (fitted in numpy on the raw embeddings, no second inference pass) -> index ->
evaluate -> deploy. It then produces, in one folder:

1. Table 1: every model scored on the same impression lists by the evaluation stage's
   own scoring functions (`visrec.stages.evaluate.evaluation`), with one paired bootstrap for every
   interval and every uplift over the baseline, and what each embedding sees (its nearest
   neighbours' agreement on the hidden shape, colour, pattern and category);
2. the PCA trade-off: nDCG@5 and measured index bytes per item per PCA size;
3. a simulated online A/B test: the generator's hidden user model
   (`visrec.sim.demo_data.tap_probability`) plays users, split by a hash of the user id,
   against two releases (baseline and candidate) served by real `visrec serve`
   processes on loopback, with the price filter and the category re-rank switched on
   and off through the server's flags;
4. `study.json`, `study.md`, PNG plots and the evaluation's HTML gate report.

The data are synthetic and the figures are this study's, not the paper's.

Modules, one concern each: `config` (settings, the paper's figures, which PCA sizes),
`stats` (Table 1 scoring, bootstrap intervals, neighbour agreement, the A/B summary), `ab` (traffic split,
sessions, simulated taps, replay against `visrec serve`), `stages` (stage timings and
`resume`), `report` (`study.json`'s content, `study.md`, the terminal summary), `plots`
(the PNG figures), `run` (`run_study`: the stages in order).
"""
