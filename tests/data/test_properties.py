"""Property tests over arbitrary valid rows (hypothesis)."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_ce.data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, build_sft_dataset

from .helpers import stream_of, write_jsonl
from .test_packing import check_boundary_rows

# any text: unicode, punctuation, newlines, template-like characters; no leading whitespace (a token
# may legitimately merge a template's trailing newline with a turn's leading spaces). Whitespace-only
# texts become "" (an empty response: dropped and counted).
_chars = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\t {}<>|#")
text = st.text(_chars, min_size=0, max_size=30).map(str.lstrip)
nonempty = text.filter(bool)

alpaca_row = st.fixed_dictionaries({"instruction": text, "output": text},
                                   optional={"input": text})


@st.composite
def messages_row(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(text)})
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(text)})
        msgs.append({"role": "assistant", "content": draw(text)})
    return {"messages": msgs}


def _expected_chat(row, eos):
    """(kept?, expected assistant targets) of one row in chat format."""
    if "messages" in row:
        turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    else:
        turns = [row["output"]]
    if any(not t.strip() for t in turns):
        return False, None
    return True, "".join(t + eos for t in turns)


_settings = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@_settings
@given(a_rows=st.lists(alpaca_row, min_size=0, max_size=6), m_rows=st.lists(messages_row(), min_size=0, max_size=6),
       seed=st.integers(0, 2 ** 16))
def test_chat_mask_covers_exactly_the_response_and_packing_conserves_tokens(tok, tmp_path_factory, a_rows, m_rows,
                                                                            seed):
    d = tmp_path_factory.mktemp("prop")
    paths = ([write_jsonl(d / "a.jsonl", a_rows)] if a_rows else []) + (
        [write_jsonl(d / "m.jsonl", m_rows)] if m_rows else [])
    rows = a_rows + m_rows
    expected = [_expected_chat(r, tok.eos_token) for r in rows]
    kept = [e for ok, e in expected if ok]
    if not paths or not kept:
        return
    train, _, stats = build_sft_dataset(paths, tok, 2048, fmt="chat", packing="boundary", shuffle=False)
    assert stats.rows_read == len(rows)
    assert stats.dropped_empty_response == len(rows) - len(kept) and stats.dropped_overlength == 0
    assert train.num_samples == len(kept)
    for k, want in enumerate(kept):
        ids, flags = train.sample(k)
        assert tok.decode(ids[flags == 1]) == want
    check_boundary_rows(train)

    # packing conserves every token in the other modes too, with shuffling by seed
    longest = max(len(train.sample(k)[0]) for k in range(train.num_samples))
    for packing, seq in (("reference", 64), ("boundary", max(64, longest))):
        ds, _, _ = build_sft_dataset(paths, tok, seq, fmt="chat", packing=packing, seed=seed)
        if packing == "reference":
            got = np.concatenate([ds[i]["tokens"][ds[i]["document_ids"] >= 0].numpy() for i in range(len(ds))])
            np.testing.assert_array_equal(got, stream_of(ds))
            assert sorted(map(tuple, (ds.sample(k)[0].tolist() for k in range(ds.num_samples)))) == sorted(
                map(tuple, (train.sample(k)[0].tolist() for k in range(train.num_samples))))
        else:
            check_boundary_rows(ds)


@_settings
@given(rows=st.lists(alpaca_row, min_size=1, max_size=8))
def test_alpaca_text_and_response_mask(tok, tmp_path_factory, rows):
    path = write_jsonl(tmp_path_factory.mktemp("alp") / "a.jsonl", rows)
    kept = [r for r in rows if r["output"].strip()]
    if not kept:
        return
    train, _, stats = build_sft_dataset(path, tok, 2048, fmt="alpaca", packing="none", loss_on="response",
                                        shuffle=False)
    assert stats.dropped_empty_response == len(rows) - len(kept)
    for k, r in enumerate(kept):
        ids, flags = train.sample(k)
        prompt = (ALPACA_PROMPT_WITH_INPUT.format(instruction=r["instruction"], input=r["input"]) if r.get("input")
                  else ALPACA_PROMPT.format(instruction=r["instruction"]))
        assert tok.decode(ids) == prompt + r["output"] + tok.eos_token
        assert tok.decode(ids[flags == 1]) == r["output"] + tok.eos_token
