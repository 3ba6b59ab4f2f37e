"""Exports of training runs and the serving engines' view of them.

``from_run`` writes any checkpoint of a run in its drafter kind's serving layout (the layouts
themselves belong to the kinds: ``dflash.drafters.dflash.hf``, ``dflash.drafters.orthrus.hf``);
``serving`` / ``vllm_*`` run an export in PyTorch, ``transformers`` and vLLM for comparison.
"""
