"""The KFP pipeline graph and the ways to run it: compile, run locally (`kfp.local`), the demo."""
