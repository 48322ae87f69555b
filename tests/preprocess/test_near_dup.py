"""Near-duplicate detection on tiny literal corpora: planted copies found, unrelated text left
alone, the kept document the first in corpus order whatever the partitioning."""

import random

import numpy as np
import pytest

from tasks.preprocess import near_dup
from tokenmill.data_quality import NearDupConfig

CFG = NearDupConfig()
VOCAB = [f"w{i}" for i in range(3000)]


def doc(r: random.Random, n: int = 300) -> str:
    return " ".join(r.choice(VOCAB) for _ in range(n))


def edited(r: random.Random, text: str, fraction: float) -> str:
    words = text.split()
    for i in r.sample(range(len(words)), round(len(words) * fraction)):
        words[i] = r.choice(VOCAB)
    return " ".join(words)


def find(partitions: list[list[str]], cfg: NearDupConfig = CFG, exclude=None) -> near_dup.NearDuplicates:
    sigs = [near_dup.signatures(p, cfg) for p in partitions]
    exclude = exclude or [np.empty(0, np.int64)] * len(partitions)
    return near_dup.near_duplicates([len(p) for p in partitions], sigs.__getitem__, exclude, cfg)


def dropped(result: near_dup.NearDuplicates) -> set[tuple[int, int]]:
    return {(p, int(i)) for p, drops in enumerate(result.drops) for i in drops}


def test_signatures_are_deterministic_and_ignore_case_and_punctuation():
    r = random.Random(0)
    text = doc(r)
    a, b = near_dup.signatures([text, text.upper().replace(" ", ", ")], CFG)
    assert a.dtype == np.uint32 and a.shape == (CFG.num_perm,)
    assert (a == b).all()
    assert (near_dup.signatures([text], CFG)[0] == a).all()


def test_a_document_shorter_than_an_ngram_has_no_signature():
    sig = near_dup.signatures(["one two three four", "", "five six seven eight nine"], CFG)
    assert (sig[0] == near_dup.EMPTY).all() and (sig[1] == near_dup.EMPTY).all()
    assert (sig[2] != near_dup.EMPTY).all()


def test_similarity_estimates_the_jaccard_of_word_ngrams():
    r = random.Random(1)
    base = doc(r, 600)
    copy, other = edited(r, base, 0.01), doc(r, 600)
    a, b, c = near_dup.signatures([base, copy, other], CFG)
    # 1% of words edited touches about 5% of the 5-grams: Jaccard about 0.9
    assert 0.8 <= near_dup.similarity(a, b) <= 0.99
    assert near_dup.similarity(a, c) < 0.05


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_lsh_bands_fit_the_signature_and_put_the_s_curve_near_the_threshold(threshold):
    bands, rows = near_dup.lsh_params(threshold, 128)
    assert bands * rows <= 128
    middle = (1 / bands) ** (1 / rows)  # similarity at which half of the pairs become candidates
    assert abs(middle - threshold) < 0.12


def test_planted_near_duplicates_are_found_across_partitions_and_unrelated_ones_are_not():
    r = random.Random(2)
    originals = [doc(r, 400) for _ in range(60)]
    copies = [edited(r, originals[i], 0.01) for i in range(0, 60, 3)]  # Jaccard about 0.9
    result = find([originals[:30], originals[30:] + copies])
    assert dropped(result) == {(1, 30 + j) for j in range(len(copies))}
    kept = [tuple(k) for k in result.kept[1]]
    assert kept == [(i // 30, i % 30) for i in range(0, 60, 3)]
    assert (result.similarity[1] >= CFG.threshold).all()


def test_the_first_document_in_corpus_order_is_kept_whatever_the_partitioning():
    r = random.Random(3)
    base = doc(r)
    cluster = [base, edited(r, base, 0.01), edited(r, base, 0.01)]
    others = [doc(r) for _ in range(6)]
    corpus = [others[0], cluster[2], others[1], cluster[0], others[2], cluster[1], *others[3:]]
    whole = find([corpus])
    assert dropped(whole) == {(0, 3), (0, 5)}
    assert [tuple(k) for k in whole.kept[0]] == [(0, 1), (0, 1)]
    split = find([corpus[:2], corpus[2:4], corpus[4:]])
    assert dropped(split) == {(1, 1), (2, 1)}
    assert [tuple(k) for k in split.kept[1]] == [(0, 1)] and [tuple(k) for k in split.kept[2]] == [(0, 1)]


def test_documents_already_dropped_as_exact_duplicates_are_not_counted_again():
    r = random.Random(4)
    base = doc(r)
    result = find([[base, base, edited(r, base, 0.01)]], exclude=[np.array([1])])
    assert dropped(result) == {(0, 2)}


def test_no_two_survivors_are_near_duplicates_so_no_val_document_has_a_copy_in_train():
    r = random.Random(5)
    family = [doc(r) for _ in range(10)]
    corpus = family + [edited(r, family[i % 10], 0.01) for i in range(30)]
    sigs = near_dup.signatures(corpus, CFG)
    result = find([corpus])
    kept = np.setdiff1d(np.arange(len(corpus)), result.drops[0])
    assert len(kept) == 10
    sims = near_dup.similarity(sigs[kept][:, None, :], sigs[kept][None, :, :])
    assert (sims[~np.eye(len(kept), dtype=bool)] < CFG.threshold).all()
