"""quanda's metrics run on this library's scores through HistoryExplainer (quanda is a test
dependency: CI installs it, and a missing quanda fails here instead of skipping)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from attribution import explain, self_influence
from attribution.demo.data import Digits
from attribution.integrations.quanda import HistoryExplainer

from .test_api import WideMLP, mislabeled  # noqa: F401 (the session fixture)


def test_quanda_mislabeling_detection_on_self_influence(mislabeled) -> None:  # noqa: F811
    # quanda after the adapter: it gives quanda placeholders where torchvision is missing
    from quanda.explainers import RandomExplainer
    from quanda.metrics.downstream_eval import MislabelingDetectionMetric

    path, x, y, bad = mislabeled
    train = TensorDataset(x, y)
    model = WideMLP()
    metric = MislabelingDetectionMetric(
        model,
        train,
        mislabeling_indices=bad.tolist(),
        explainer_cls=HistoryExplainer,
        expl_kwargs={"store": path, "weights": "store", "test_batch_size": len(x)},
    )
    out = metric.compute()
    # quanda ranks by our self-influence (high first): the same scores as ours
    ours = self_influence(path, WideMLP(), x, progress=False, test_batch_size=len(x))["fc2"]
    si = metric.explainer.self_influence()
    np.testing.assert_allclose(si.numpy(), ours, rtol=1e-6, atol=1e-12)
    first = out["success_arr"][: len(bad)]
    assert int(first.sum()) >= len(bad) - 1, out["success_arr"][:20]
    # area under the detection curve: 0.5 is chance; quanda's own random explainer for scale
    rnd = MislabelingDetectionMetric(
        model, train, mislabeling_indices=bad.tolist(), explainer_cls=RandomExplainer
    ).compute()["score"]
    assert out["score"] > 0.85 and abs(rnd - 0.5) < 0.2, (out["score"], rnd)


def test_quanda_class_detection_on_explain(mislabeled, digits: Digits) -> None:  # noqa: F811
    from quanda.metrics.downstream_eval import ClassDetectionMetric

    path, x, y, _bad = mislabeled
    train = TensorDataset(x, y)
    test_x, test_y = digits.x_test[:40], digits.y_test[:40]
    model = WideMLP()
    expl = HistoryExplainer(model, train, store=path, weights="store", layer="fc1")
    scores = expl.explain(test_x, targets=test_y)
    assert scores.shape == (40, len(x)) and scores.dtype == torch.float32
    res = explain(
        path, WideMLP(), test_x, layers=["fc1"], top_k=5, progress=False, test_batch_size=40
    )
    top = res.topk("fc1")[0]
    np.testing.assert_array_equal(scores.topk(5, dim=1).indices.numpy(), top)
    metric = ClassDetectionMetric(model, train, s=5)
    metric.update(scores, test_y)
    score = metric.compute()["score"]
    # quanda's number is the share of (noisy) training labels equal to the test label among
    # our top 5; chance is about 0.1
    expect = (y[top] == test_y[:, None]).float().mean().item()
    assert score == pytest.approx(expect) and score > 0.4, score
    # cosine scores through the same adapter; train_ids maps a subset's items to recorded ids
    sub = torch.arange(100, 300)
    cos = HistoryExplainer(
        model, TensorDataset(x[sub], y[sub]), store=path, score="cosine", train_ids=sub.numpy()
    )
    full_cos = HistoryExplainer(model, train, store=path, score="cosine")
    np.testing.assert_allclose(
        cos.explain(test_x[:4]).numpy(), full_cos.explain(test_x[:4]).numpy()[:, 100:300]
    )
    with pytest.raises(ValueError, match="train_ids"):
        HistoryExplainer(model, train, store=path, train_ids=[0, 1])


@pytest.mark.parametrize("method", ["tracin", "epk"])
def test_quanda_explainer_refuses_path_methods_clearly(mislabeled, method) -> None:  # noqa: F811
    path, x, y, _bad = mislabeled
    with pytest.raises(ValueError, match="preactivation method"):
        HistoryExplainer(WideMLP(), TensorDataset(x, y), store=path, method=method)
