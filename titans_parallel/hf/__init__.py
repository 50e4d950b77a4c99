"""A Hugging Face `transformers` face for TitansLM. `configuration_titans`, `modeling_titans` and
`tokenization_titans` are the remote code of an export (`export.save_hf_export`, which copies them and the model's
modules into it), loaded with `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(path, trust_remote_code=True)`.
Importing this package imports neither transformers nor the export code."""
