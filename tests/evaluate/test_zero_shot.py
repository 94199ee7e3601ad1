"""Zero-shot classification and retrieval metrics on hand-made embeddings."""

import numpy as np

from jaxaigc.evaluate import zero_shot


def test_topk_accuracy_hand_case():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 2])
    got = zero_shot.topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert got == {"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0}


def test_retrieval_recall_perfect_and_shuffled():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(50, 16))
    recall = zero_shot.retrieval_recall(images, images + 0.01 * rng.normal(size=images.shape))
    assert recall["image_to_text_R@1"] == 1.0 and recall["text_to_image_R@1"] == 1.0
    swapped = np.concatenate([images[1:2], images[0:1], images[2:]])
    recall = zero_shot.retrieval_recall(images, swapped, ks=(1, 50))
    assert recall["image_to_text_R@1"] == 48 / 50 and recall["text_to_image_R@1"] == 48 / 50
    assert recall["image_to_text_R@50"] == 1.0
