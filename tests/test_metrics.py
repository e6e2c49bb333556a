"""Metrics against numbers worked out by hand (see the comments), MCC also against scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from medi_dist.evaluate import metrics as M

# Two classes (A, B), two sites. Pairs are (true, predicted).
# site s1: (A,A) (A,A) (A,B) (B,B) -> accuracy 3/4; recall A 2/3, B 1   -> balanced 5/6
# site s2: (A,B) (B,B) (B,B) (B,A) -> accuracy 2/4; recall A 0,   B 2/3 -> balanced 1/3
# overall: recall A = 2/4, recall B = 3/4 -> balanced 5/8; site-averaged (5/6 + 1/3)/2 = 7/12
# MCC with A positive: TP 2, FN 2, FP 1, TN 3 -> (2*3 - 1*2) / sqrt(3*4*4*5) = 4/sqrt(240)
Y_TRUE = np.array(["A", "A", "A", "B", "A", "B", "B", "B"])
Y_PRED = np.array(["A", "A", "B", "B", "B", "B", "B", "A"])
SITES = np.array(["s1"] * 4 + ["s2"] * 4)


def test_hand_computed_two_class_two_site():
    assert M.balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx(5 / 8)
    assert M.site_averaged_balanced_accuracy(Y_TRUE, Y_PRED, SITES) == pytest.approx(7 / 12)
    assert M.worst_site_accuracy(Y_TRUE, Y_PRED, SITES) == pytest.approx(0.5)
    assert M.mcc(Y_TRUE, Y_PRED) == pytest.approx(4 / math.sqrt(240))
    assert M.mcc(Y_TRUE, Y_PRED) == pytest.approx(matthews_corrcoef(Y_TRUE, Y_PRED))
    got = M.all_metrics(Y_TRUE, Y_PRED, SITES)
    assert set(got) == set(M.METRIC_NAMES)
    assert got["site_balanced_accuracy"] == pytest.approx(7 / 12)


def test_single_class_site_scores_that_class_recall():
    # site s3 holds only A: (A,A) (A,B) -> balanced accuracy = recall of A = 1/2
    yt = np.array(["A", "A"])
    yp = np.array(["A", "B"])
    assert M.site_averaged_balanced_accuracy(yt, yp, ["s3", "s3"]) == pytest.approx(0.5)
    # added to the example: (5/6 + 1/3 + 1/2) / 3 = 5/9
    got = M.site_averaged_balanced_accuracy(np.r_[Y_TRUE, yt], np.r_[Y_PRED, yp], np.r_[SITES, ["s3", "s3"]])
    assert got == pytest.approx(5 / 9)


def test_multiclass_mcc_by_hand_and_sklearn():
    # confusion rows=true [[1,1,0],[0,2,0],[1,0,1]]: t=(2,2,2), p=(2,3,1), c=4, s=6
    # (4*6 - (4+6+2)) / sqrt((36-14)*(36-12)) = 12 / sqrt(528)
    yt = np.array([0, 0, 1, 1, 2, 2])
    yp = np.array([0, 1, 1, 1, 2, 0])
    assert M.mcc(yt, yp) == pytest.approx(12 / math.sqrt(528))
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
        assert M.mcc(a, b) == pytest.approx(matthews_corrcoef(a, b))
    assert M.mcc([1, 1, 1], [1, 1, 1]) == 0.0  # undefined -> 0, like sklearn


def test_subgroup_table_and_names():
    tab = M.subgroup_table(Y_TRUE, Y_PRED, SITES)
    rows = {(r.cancer_type, r.site): (r.n, r.correct) for r in tab.itertuples()}
    assert rows == {("A", "s1"): (3, 2), ("A", "s2"): (1, 0), ("B", "s1"): (1, 1), ("B", "s2"): (3, 2)}
    assert tab["accuracy"].tolist() == pytest.approx([2 / 3, 0.0, 1.0, 2 / 3])
    ints = M.subgroup_table([0, 1, 1], [0, 1, 0], ["x", "x", "x"], class_names=["LUAD", "LUSC"])
    assert ints["cancer_type"].tolist() == ["LUAD", "LUSC"]
    assert ints["accuracy"].tolist() == pytest.approx([1.0, 0.5])


def test_mean_sem_and_table():
    runs = [
        {"balanced_accuracy": 0.6, "mcc": 0.2},
        {"balanced_accuracy": 0.8, "mcc": 0.2},
        {"balanced_accuracy": 0.7, "mcc": 0.2},
    ]
    ms = M.mean_sem(runs)
    # std(ddof=1) of (0.6, 0.8, 0.7) is 0.1, so SEM = 0.1 / sqrt(3)
    assert ms["balanced_accuracy"] == pytest.approx((0.7, 0.1 / math.sqrt(3)))
    assert ms["mcc"] == pytest.approx((0.2, 0.0))
    assert M.mean_sem(runs[:1])["balanced_accuracy"] == (0.6, 0.0)
    text = M.format_table({"r=0": ms, "r=1.5": M.mean_sem(runs[:1])})
    lines = text.splitlines()
    assert "balanced_accuracy" in lines[0] and "mcc" in lines[0]
    assert "0.700 ± 0.058" in lines[2] and lines[3].startswith("r=1.5")
    with pytest.raises(ValueError):
        M.mean_sem([{"a": 1.0}, {"b": 1.0}])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="lengths"):
        M.all_metrics([0, 1], [0], ["s", "s"])
