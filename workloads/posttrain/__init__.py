"""`python -m workloads.posttrain +algo=sft|dpo|rlvr|upo`: post-training jobs (see __main__.py)."""
