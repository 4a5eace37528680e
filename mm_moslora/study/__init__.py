"""Seeded comparison of adapter variants (LoRA, MoSLoRA, mixer options): runner, statistics, report.

scripts/compare_adapters.py is its command line; docs/adapter_study.md the study made with it.
"""
