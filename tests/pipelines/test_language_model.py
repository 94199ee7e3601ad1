"""A GPT-2 converted from a Hugging Face folder (weights and BPE files) loads as a run whose
``respond`` continues text as ``transformers`` does: the same tokens, greedy, prompt by prompt."""

import json

import pytest

from jaxaigc import cli, pipelines
from jaxaigc.data.tokenizers import GPT2_EOS, Gpt2Tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "a small red circle above a large blue square.",
    "reverse the word cat: tac. sort the letters: act.",
] * 20


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Hugging Face GPT-2 folder: random weights (peaked logits, so greedy ties are unlikely)
    and a byte-level BPE with GPT-2's EOS, learnt on a small corpus."""
    torch = pytest.importorskip("torch", reason="the GPT-2 reference needs torch")
    transformers = pytest.importorskip("transformers", reason="the reference extra")
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("hf_gpt2")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, vocab_size=320, special_tokens=[GPT2_EOS], show_progress=False)
    bpe.save_model(str(folder))
    eos = bpe.token_to_id(GPT2_EOS)
    config = transformers.GPT2Config(
        vocab_size=bpe.get_vocab_size(),
        n_positions=40,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + float("ln" in name and name.endswith("weight")))
    model.save_pretrained(folder)
    return folder, model, transformers.GPT2TokenizerFast.from_pretrained(folder)


def test_the_tokenizer_is_gpt2s(hf_folder):
    folder, _, reference = hf_folder
    ours = Gpt2Tokenizer.from_folder(folder)
    for text in ["the lazy fox", "Zebra 12 ?!  spaces", CORPUS[1], f"a{GPT2_EOS}b"]:
        assert ours.tokenize(text) == reference(text)["input_ids"]
    assert ours.eos_id == reference.eos_token_id


def test_converted_gpt2_continues_as_transformers_does(hf_folder, tmp_path, capsys):
    folder, reference, tokenizer = hf_folder
    (weights,) = folder.glob("model.safetensors")
    cli.main(["convert", "gpt2", str(weights), str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["recipe"] == "gpt2"
    model = pipelines.load(tmp_path / "run")
    assert isinstance(model, pipelines.LanguageModel)
    prompts = ["the quick brown", "a small red circle above a large blue square. sort", "re"]
    got = model.respond(prompts, max_tokens=12)  # one left-padded batch
    import torch

    for prompt, response in zip(prompts, got, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = reference.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
        new = out[0, ids.shape[1] :].tolist()
        eos = tokenizer.eos_token_id
        assert response == tokenizer.decode(new[: new.index(eos)] if eos in new else new)
    cli.main(["respond", str(tmp_path / "run"), prompts[0], "--max-tokens", "12"])
    assert capsys.readouterr().out.strip().endswith(f"-> {got[0]}")
    with pytest.raises(ValueError, match="context of 40 tokens"):
        model.respond(["the " * 40])


def test_a_gpt2_without_its_tokenizer_is_refused_before_writing(hf_folder, tmp_path):
    folder, _, _ = hf_folder
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", "gpt2", str(lone / "model.safetensors"), str(tmp_path / "run")])
    assert exit_.value.code == 2 and not (tmp_path / "run").exists()
