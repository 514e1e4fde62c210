import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="session")
def tok():
    from megatron_ce.data import load_tokenizer

    return load_tokenizer(EXAMPLES / "tokenizer")


@pytest.fixture(scope="session")
def spm_tok(tmp_path_factory):
    """A sentencepiece (Llama-style, BOS added) tokenizer trained on the bundled data."""
    import sentencepiece as spm

    from megatron_ce.data import load_tokenizer

    d = tmp_path_factory.mktemp("spm")
    texts = []
    for line in open(EXAMPLES / "sft_tiny.jsonl", encoding="utf-8"):
        r = json.loads(line)
        texts.append(r["instruction"] + "\n" + r["output"])
    texts.append("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request. ### Instruction: ### Response: ### Input:")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(d / "tokenizer"), vocab_size=500,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    return load_tokenizer(d)

