"""The paper preset: the paper's experiments on real LLaVA-1.5-7B / Qwen2.5-VL-3B (GPUs), or the same chain on
the shipped miniatures (CPU), from one recipe file.

    recipes.py     Recipe: a small YAML per backbone x target (recipes/*.yaml), checked field by field
    data.py        the reader of the local data format (data_scripts/README.md)
    finetune.py    transformers Trainer on the merge set, accumulating the per-sample empirical Fisher h_ft
    curvature.py   h_pt at w_pt on the calibration set, over the processes accelerate starts
    evaluate.py    scoring (lmms-eval tasks or the local data) and the results table
    chain.py       data -> finetune -> curvature -> merge -> evaluate -> results, resumable, one folder a step
    costs.py       GPU-hours and memory per step from FLOPs and bytes (the dry run and the guide's table)

Command line: `python -m cgm_min.cli.reproduce RECIPE [--step S] [--dry-run] [--out DIR]`.
"""
