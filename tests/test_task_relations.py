import numpy as np
import pytest
import torch

from mtl_core.evaluation.task_relations import error_correlation
from mtl_core.figures.task_matrix import plot_task_matrix
from mtl_core.training.gradient_cosine import cosine_matrix, GradientCosineTracker


def test_cosine_matrix_of_hand_made_gradients():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    m = cosine_matrix(g)
    r = 1 / np.sqrt(2)
    expected = np.array([[1, 0, -1, r], [0, 1, 0, r], [-1, 0, 1, -r], [r, r, -r, 1]])
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_tracker_measures_on_shared_params_and_averages_per_epoch():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    # d/dw of a.w is a: task a pulls along x, task b along y, task c against x
    losses = {"a": w @ torch.tensor([1.0, 0.0]), "b": w @ torch.tensor([0.0, 5.0]), "c": w @ torch.tensor([-2.0, 0.0])}
    tracker = GradientCosineTracker(["a", "b", "c"], every=3)
    assert [tracker.due(s) for s in range(5)] == [True, False, False, True, False]
    first = tracker.measure(losses, [w])
    np.testing.assert_allclose(first, [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-12)
    # second measurement where a and c agree: the epoch average is the mean of both
    losses2 = {"a": w @ torch.tensor([1.0, 0.0]), "b": w @ torch.tensor([0.0, 1.0]), "c": w @ torch.tensor([2.0, 0.0])}
    tracker.measure(losses2, [w])
    avg = tracker.epoch_average()
    assert avg[0, 2] == pytest.approx(0.0) and avg[0, 1] == pytest.approx(0.0) and avg[1, 1] == pytest.approx(1.0)
    assert tracker.epoch_average() is None
    assert w.grad is None  # measuring leaves .grad alone


def test_tracker_leaves_an_unlabelled_task_out_of_the_average():
    """Task c is unlabelled in the second batch (zero loss, zero gradient): its pairs average over the
    first batch only, instead of being pulled towards 0 by a gradient that is not there."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    tracker = GradientCosineTracker(["a", "b", "c"], every=1)
    tracker.measure({"a": w @ torch.tensor([1.0, 0.0]), "b": w @ torch.tensor([1.0, 1.0]), "c": w @ torch.tensor([-1.0, 0.0])}, [w])
    tracker.measure({"a": w @ torch.tensor([1.0, 0.0]), "b": w @ torch.tensor([0.0, 1.0]), "c": w.sum() * 0.0}, [w],
                    labelled=torch.tensor([True, True, False]))  # fmt: skip
    avg = tracker.epoch_average()
    r = 1 / np.sqrt(2)
    assert avg[0, 2] == pytest.approx(-1.0) and avg[2, 2] == pytest.approx(1.0)
    assert avg[1, 2] == pytest.approx(-r)
    assert avg[0, 1] == pytest.approx((r + 0.0) / 2)
    # a pair never labelled together is NaN, not 0
    tracker.measure({"a": w[0], "b": w[1], "c": w.sum() * 0.0}, [w], labelled=torch.tensor([True, True, False]))
    assert np.isnan(tracker.epoch_average()[0, 2])


def test_tracker_effective_learning_rate_and_alignment_by_hand():
    """An SGD step of size 0.1 along task a's gradient: a sees exactly lr 0.1 and alignment 1; task b
    (gradient (1, 1)) sees -d.g_b/|g_b|^2 = 0.3/2 and cos = 0.3/(0.3*sqrt(2)); c is unlabelled (NaN)."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    tracker = GradientCosineTracker(["a", "b", "c"], every=1)
    losses = {"a": w @ torch.tensor([3.0, 0.0]), "b": w @ torch.tensor([1.0, 1.0]), "c": w.sum() * 0.0}
    tracker.measure(losses, [w], labelled=torch.tensor([True, True, False]))
    with torch.no_grad():
        w -= 0.1 * torch.tensor([3.0, 0.0])
    tracker.after_step([w])
    tracker.after_step([w])  # nothing pending: no second record
    stats = tracker.epoch_task_stats()
    assert stats["a"] == pytest.approx({"grad_norm": 3.0, "effective_lr": 0.1, "step_alignment": 1.0})
    assert stats["b"] == pytest.approx({"grad_norm": np.sqrt(2), "effective_lr": 0.15, "step_alignment": 1 / np.sqrt(2)})
    assert all(np.isnan(v) for v in stats["c"].values())
    assert all(np.isnan(v) for v in tracker.epoch_task_stats()["a"].values())  # reset after the epoch


def test_error_correlation_by_hand():
    targets = np.array([[0, 0], [0, 0], [1, 1], [1, -1], [0, 1]])
    # task a wrong on samples 0 and 2; task b wrong on 0, 2 and 4; sample 3 has no b label
    probs = {
        "a": np.array([[0.2, 0.8], [0.9, 0.1], [0.7, 0.3], [0.1, 0.9], [0.6, 0.4]]),
        "b": np.array([[0.3, 0.7], [0.8, 0.2], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]]),
    }
    m = error_correlation(probs, targets, ["a", "b"])
    ea, eb = np.array([1, 0, 1, 0]), np.array([1, 0, 1, 1])  # samples 0, 1, 2, 4
    assert m[0, 1] == pytest.approx(np.corrcoef(ea, eb)[0, 1]) and m[0, 1] == m[1, 0]
    assert m[0, 0] == pytest.approx(1.0)


def test_error_correlation_is_nan_without_variance(tmp_path):
    targets = np.array([[0, 0], [1, 1], [0, 1]])
    perfect = {"a": np.eye(2)[targets[:, 0]], "b": np.eye(2)[1 - targets[:, 1]]}
    m = error_correlation(perfect, targets, ["a", "b"])
    assert np.isnan(m[0, 1]) and np.isnan(m[0, 0])
    plot_task_matrix(m, ["a", "b"], "errors", tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_cluster_order_puts_two_interleaved_blocks_side_by_side():
    """Tasks a0..a2 pull together (0.8, 0.9 within), as do b0..b2 (0.7); across the blocks -0.3; in the
    given order the blocks interleave (a0 b0 a1 b1 a2 b2). The clustering's leaves come out block by block,
    and the heatmap's rows and columns follow them."""
    from mtl_core.figures.task_matrix import cluster_order, task_matrix_figure

    names = ["a0", "b0", "a1", "b1", "a2", "b2"]
    block = np.array([n[0] for n in names])
    m = np.where(block[:, None] == block[None, :], np.where(block[:, None] == "a", 0.9, 0.7), -0.3)
    m[0, 2] = m[2, 0] = 0.8
    np.fill_diagonal(m, 1.0)
    order = [names[i] for i in cluster_order(m)]
    assert sorted(order) == sorted(names)
    first, second = {t[0] for t in order[:3]}, {t[0] for t in order[3:]}
    assert len(first) == len(second) == 1 and first | second == {"a", "b"}  # block by block
    # inside a block, neighbours as similar as possible: a0-a1 is the weaker pair (0.8), so a2 between them
    a = [t for t in order if t[0] == "a"]
    assert a in (["a0", "a2", "a1"], ["a1", "a2", "a0"])
    fig = task_matrix_figure(m, names, "blocks")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == order
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == order
    shown = fig.axes[0].images[0].get_array()
    assert np.allclose(shown, m[np.ix_(cluster_order(m), cluster_order(m))])
    # a NaN pair counts as unrelated; nothing measured, or two tasks: the given order
    m[0, 1] = m[1, 0] = np.nan
    assert sorted(cluster_order(m)) == list(range(6))
    assert list(cluster_order(np.full((4, 4), np.nan))) == [0, 1, 2, 3] and list(cluster_order(np.eye(2))) == [0, 1]
