"""Run configs for train.py: each file's ``get_config(arg)`` returns a locked ConfigDict."""
