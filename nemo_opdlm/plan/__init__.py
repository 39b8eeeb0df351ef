"""``opdlm plan``: a dry run of a recipe on a CPU, before a job waits hours in a queue.

One job: resolve a recipe with its overrides and refuse it, with the fix named, when it cannot
run on the cluster it is meant for: the TP/PP layout must divide both models and the world, DP
must divide the prompts of a step, the checkpoints on disk (when present here) must have the
architectures and tokenizer the recipe assumes, and the estimated memory per GPU must fit.
Non-goals: building models or touching a GPU.

- ``layout.py``: the cluster, the GPU kinds and the layout's shape (what memory depends on);
- ``checks.py``: the checkpoints, tokenizers and data on this machine against the recipe;
- ``memory.py``: the closed-form memory model of a step, per phase and component;
- ``measure.py``: the same step run under fake tensors (``--measure``), the model's check;
- ``remedies.py``: single changes that lower the peak, and a combination that fits;
- ``report.py``: all of it as one report; ``cli.py``: the command.

    opdlm plan qwen3_8b_self_tp2_pp1_8g
    opdlm plan qwen3:qwen3_8b_self_tp2_pp1_8g train.micro_batch_size=2 --gpu h200 --nodes 2
    opdlm plan qwen3_8b_self_tp2_pp1_8g --measure rollout.max_length=512
"""
