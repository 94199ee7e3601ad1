"""WordNet definitions for captions and glosses for the pretraining corpus."""

import pytest

from jaxaigc.data import wordnet

pytestmark = pytest.mark.skipif(
    not (wordnet.WORDNET_DIR / "index.noun").exists(),
    reason="sudo apt-get install -y wordnet-base for the WordNet tests",
)


def test_a_noun_is_defined_by_its_most_frequent_sense_without_examples():
    assert wordnet.noun_definition("dog").startswith("a member of the genus Canis")
    assert wordnet.noun_definition("ice cream") == wordnet.noun_definition("ice_cream")
    assert wordnet.noun_definition("ice cream").startswith("frozen dessert")
    assert '"' not in wordnet.noun_definition("dog")  # the gloss's quoted examples are cut
    assert wordnet.noun_definition("zzyzx") is None


def test_a_name_is_defined_as_a_whole_then_word_by_word_without_repeats():
    definitions = wordnet.name_definitions("ice cream")
    assert definitions[0] == wordnet.noun_definition("ice cream")
    assert definitions[1:] == (wordnet.noun_definition("ice"), wordnet.noun_definition("cream"))
    assert wordnet.name_definitions("face face") == (wordnet.noun_definition("face"),)
    assert wordnet.name_definitions("with of") == ()


def test_every_synset_has_a_lemma_and_a_gloss():
    nouns = list(wordnet.synsets("noun"))
    assert len(nouns) == 82115  # WordNet 3.0
    assert all(lemma and gloss for lemma, gloss in nouns)
    assert ("dog", wordnet.noun_definition("dog")) not in nouns  # glosses keep their examples


def test_a_missing_package_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y wordnet-base"):
        wordnet.noun_definition("dog", tmp_path)


def test_kinds_of_follow_hypernyms_to_the_given_words_within_the_depth():
    pairs = wordnet.kinds_of({"bird", "dog"}, depth=2)
    assert ("eagle", "bird") in pairs  # eagle -> bird of prey -> bird
    assert ("eagle", "bird") not in wordnet.kinds_of({"bird"}, depth=1)
    assert ("puppy", "dog") in pairs and ("dog", "dog") not in pairs
    assert list(pairs) == sorted(pairs) and {w for _, w in pairs} <= {"bird", "dog"}
