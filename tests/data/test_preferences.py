"""Your own InstructGPT data as JSONL: prompts, demonstrations, K-way rankings and HH-RLHF
chosen / rejected pairs; bad lines skipped and counted where they are, never shifting a record;
missing and unusable files named."""

import json

import pytest

from jaxaigc.data import preferences as prefs

HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: No idea."


def _write(path, lines) -> str:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_demonstrations_skip_bad_lines_where_they_are(tmp_path):
    path = _write(
        tmp_path / "demos.jsonl",
        [
            {"prompt": "Say hi.", "response": " hi", "source": "ignored"},
            "{not json",
            {"prompt": "Say bye."},  # no response
            "",  # blank: ignored, not counted
            {"prompt": "", "response": "x"},  # an empty prompt
            {"prompt": "Count.", "response": 3},  # not a string
            ["a", "list"],
            {"prompt": "Say yes.", "response": ""},  # an empty response is a response
        ],
    )
    demos = prefs.Demonstrations(path)
    assert demos.records == [
        prefs.Demonstration("Say hi.", " hi"),
        prefs.Demonstration("Say yes.", ""),
    ]
    assert demos.where == [f"{path}:1", f"{path}:8"]
    assert demos.skipped == 5
    assert demos.problems[0].startswith(f"{path}:2: not JSON")
    assert demos.problems[1] == f"{path}:3: no 'response' field"
    assert demos.problems[2] == f"{path}:5: 'prompt' is empty"
    assert demos.problems[3] == f"{path}:6: 'response' is not a string (int)"
    assert demos.problems[4] == f"{path}:7: a JSON list, not an object"
    assert len(demos) == 2 and demos[1].prompt == "Say yes."
    assert repr(demos).startswith("Demonstrations(1 files, 2 records, 5 skipped, first ")


def test_rankings_and_hh_pairs(tmp_path):
    path = _write(
        tmp_path / "comparisons.jsonl",
        [
            {
                "prompt": "Name a fruit.",
                "responses": [" pear", " rock", " apple"],
                "ranking": [2, 0, 1],
            },  # fmt: skip
            {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
            {"prompt": "P", "responses": ["a", "b"], "ranking": [0, 0]},  # not a permutation
            {"prompt": "P", "responses": ["a", "b"], "ranking": [True, False]},
            {"prompt": "P", "responses": ["a"], "ranking": [0]},  # K = 1
            {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: ho"},  # no assistant turn
            {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},
            {"text": "neither layout"},
        ],
    )
    comparisons = prefs.Comparisons(path)
    ranking, hh, explicit = comparisons.records
    assert ranking == prefs.Comparison("Name a fruit.", (" pear", " rock", " apple"), (2, 0, 1))
    prompt = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    assert hh == prefs.Comparison(prompt, (" It is 6.", " No idea."), (0, 1))
    assert explicit == prefs.Comparison("Q:", (" yes", " no"), (0, 1))
    reasons = [p.split(": ", 1)[1] for p in comparisons.problems]
    assert reasons == [
        '"ranking" [0, 0] is not each index 0..1 of "responses" once',
        '"ranking" [True, False] is not each index 0..1 of "responses" once',
        '"responses" is not a list of at least 2 strings',
        '"chosen" and "rejected" share no "\\n\\nAssistant:" turn',
        '"chosen" and "rejected" are the same text',
        'neither "responses" with "ranking" nor "chosen" with "rejected"',
    ]


def test_the_prompt_ends_at_the_last_shared_assistant_turn():
    # The responses share their first words: the prompt still ends at the marker.
    prompt, a, b = prefs.split_dialogue(
        "\n\nHuman: hi\n\nAssistant: Hello there", "\n\nHuman: hi\n\nAssistant: Hello you"
    )
    assert (prompt, a, b) == ("\n\nHuman: hi\n\nAssistant:", " Hello there", " Hello you")


def test_globs_several_files_and_errors_naming_the_file(tmp_path):
    for i in range(3):
        _write(tmp_path / f"prompts-{i}.jsonl", [{"prompt": f"p{i}a"}, {"prompt": f"p{i}b"}])
    prompts = prefs.Prompts(str(tmp_path / "prompts-*.jsonl"))
    assert prompts.records == ["p0a", "p0b", "p1a", "p1b", "p2a", "p2b"]
    both = prefs.Prompts(f"{tmp_path}/prompts-2.jsonl,{tmp_path}/prompts-0.jsonl")
    assert both.records == ["p2a", "p2b", "p0a", "p0b"]  # in the order given
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prefs.Prompts(str(tmp_path / "missing.jsonl"))
    bad = _write(tmp_path / "bad.jsonl", [{"question": "?"}, "[1"])
    message = r"bad.jsonl holds no usable prompt line \(.*bad.jsonl:1: no 'prompt' field; .*:2: not"
    with pytest.raises(ValueError, match=message):
        prefs.Prompts(f"{tmp_path}/prompts-0.jsonl,{bad}")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no usable prompt line .it is empty"):
        prefs.Prompts(str(tmp_path / "empty.jsonl"))


def test_pretraining_texts_from_jsonl_and_plain_files(tmp_path):
    _write(tmp_path / "a.jsonl", [{"text": "one"}, {"content": "skipped"}, {"text": "two"}])
    (tmp_path / "b.txt").write_text("A whole\ndocument.\n")
    texts = prefs.Texts(f"{tmp_path}/a.jsonl,{tmp_path}/b.txt")
    assert texts.records == ["one", "two", "A whole\ndocument.\n"]
    assert texts.skipped == 1


def test_held_out_split_is_seeded_and_disjoint():
    records = list(range(100))
    kept, held = prefs.split_held_out(records, 0.1, seed=3)
    assert len(held) == 10 and sorted(kept + held) == records
    assert held == sorted(held)  # the records' order
    assert prefs.split_held_out(records, 0.1, seed=3) == (kept, held)
    assert prefs.split_held_out(records, 0.1, seed=4)[1] != held
    assert prefs.split_held_out(records[:5], 0.01, seed=0)[1] != []  # at least one
    with pytest.raises(ValueError, match="leaves none to train on"):
        prefs.split_held_out([1], 0.5, seed=0)
