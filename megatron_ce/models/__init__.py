"""Model families on megatron-core, one package per HF model_type (`olmoe/`, `phimoe/`), found through
`registry`; `common` and `config_table` hold what the families share. Importing this package (or a
family package) imports no torch: launch/plan.py reads the presets on login nodes."""
