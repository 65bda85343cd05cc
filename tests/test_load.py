"""`legolm.load`: model and tokenizer of one checkpoint, the path resolved and each file read once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import legolm
from legolm.checkpoints import gguf as gguf_io
from legolm.checkpoints import loader as load_module
from legolm.data import tokenizer as tokenizer_module
from legolm.data.tokenizer import Tokenizer, train_bpe
from legolm.errors import TokenizerError
from legolm.utils.gguf_file import gguf_reader, read_fields
from tests.test_sizes import _llama, write_llama_gguf

TEXT = "Once upon a time a small cat sat by the sea. The sea was grey and the cat was grey too. " * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe([TEXT], 320)


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    assert (a.bos_id, a.eos_id, a.add_bos, a.vocab_size) == (b.bos_id, b.eos_id, b.add_bos, b.vocab_size)
    assert a.fingerprint() == b.fingerprint()
    assert a.encode(TEXT[:200]) == b.encode(TEXT[:200])


def _same_model(a: legolm.TransformerLM, b: legolm.TransformerLM) -> None:
    assert type(a) is type(b) and a.config == b.config and not a.training and not b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _counted(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_a_gguf_file_is_parsed_once_for_model_and_tokenizer(tmp_path: Path, bpe: Tokenizer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_llama_gguf(tmp_path / "tiny.gguf", _llama(vocab_size=bpe.vocab_size), bpe)
    separate = legolm.load_pretrained(path), legolm.load_tokenizer(path)  # the two readers, before counting
    parsed = [_counted(monkeypatch, gguf_io, "gguf_reader"), _counted(monkeypatch, tokenizer_module, "gguf_reader")]
    loaded = _counted(monkeypatch, load_module, "load_gguf")
    resolved = _counted(monkeypatch, load_module, "resolve")
    model, tokenizer = legolm.load(path)
    assert sum(map(len, parsed)) == 1 and len(loaded) == 1 and len(resolved) == 1
    _same_model(model, separate[0])
    _same_tokenizer(tokenizer, separate[1])
    assert tokenizer.encode(TEXT) == bpe.encode(TEXT) and tokenizer.eos_id == bpe.eos_id  # the file's vocabulary


def test_directories_give_the_tokenizer_beside_the_weights(tmp_path: Path, bpe: Tokenizer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = _llama(vocab_size=bpe.vocab_size)
    native = legolm.save_checkpoint(model, tmp_path / "native", bpe)
    hf = legolm.export_hf(model, tmp_path / "hf", bpe)
    for path in (native, hf):
        separate = legolm.load_pretrained(path, dtype=torch.bfloat16), legolm.load_tokenizer(path)
        resolved = _counted(monkeypatch, load_module, "resolve")
        got = legolm.load(path, dtype=torch.bfloat16)
        assert len(resolved) == 1
        assert got[0].wte.weight.dtype == torch.bfloat16
        _same_model(got[0], separate[0])
        _same_tokenizer(got[1], separate[1])


def test_a_checkpoint_without_a_tokenizer(tmp_path: Path) -> None:
    path = legolm.save_checkpoint(_llama(), tmp_path / "bare")
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        legolm.load(path)
    model, tokenizer = legolm.load(path, tokenizer_required=False)
    assert tokenizer is None
    _same_model(model, legolm.load_pretrained(path))


def test_the_chat_template_comes_with_the_tokenizer_from_every_source(tmp_path: Path, bpe: Tokenizer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF ``tokenizer.chat_template`` (read in the one parse of `load`), a directory's tokenizer_config.json
    (a string, or a named list: "default"), ``chat_template.jinja`` first; `Tokenizer.save` keeps it."""
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    path = write_llama_gguf(tmp_path / "tiny.gguf", _llama(vocab_size=bpe.vocab_size), bpe)
    fields = read_fields(gguf_reader(path))
    assert Tokenizer.from_gguf_fields({**fields, "tokenizer.chat_template": template}).chat_template == template
    assert Tokenizer.from_gguf_fields(fields).chat_template is None
    d = tmp_path / "dir"
    d.mkdir()
    bpe.save(d)
    assert Tokenizer.from_dir(d).chat_template is None
    (d / "tokenizer_config.json").write_text(f'{{"chat_template": [{{"name": "tool", "template": "x"}}, '
                                             f'{{"name": "default", "template": "{template}"}}]}}')
    assert Tokenizer.from_dir(d).chat_template == template
    (d / "chat_template.jinja").write_text("jinja first")
    loaded = Tokenizer.from_dir(d)
    assert loaded.chat_template == "jinja first"
    again = tmp_path / "again"
    again.mkdir()
    loaded.save(again)
    assert Tokenizer.from_dir(again).chat_template == "jinja first"


def test_the_real_smollm2_gguf_brings_its_chat_template(smollm2_gguf: Path) -> None:
    from legolm.serve.chat import load_chat_template

    tokenizer = legolm.load_tokenizer(smollm2_gguf)
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template
    chat = load_chat_template(tokenizer)
    assert chat is not None
    assert chat.render([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
