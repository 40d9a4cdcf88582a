"""Calibration: fitted maps are monotone, recover a known curve, round-trip through dicts, reject bad input."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.calibration import Calibration, fit_isotonic, fit_platt, reliability
from retrieval.errors import BadInput


def _synthetic(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.uniform(-0.2, 0.8, n)
    true_p = 1 / (1 + np.exp(-(12 * s - 5)))
    y = (rng.uniform(size=n) < true_p).astype(float)
    return s, y, true_p


@pytest.mark.parametrize("fit", [fit_platt, fit_isotonic])
def test_fit_recovers_a_known_logistic_curve(fit):
    s, y, _true_p = _synthetic()
    cal = fit(s, y)
    grid = np.linspace(-0.1, 0.7, 50)
    p = cal(grid)
    assert np.all(np.diff(p) >= -1e-12), "monotone in the score"
    assert np.abs(p - 1 / (1 + np.exp(-(12 * grid - 5)))).max() < 0.08
    assert reliability(cal(s), y)["ece"][0] < 0.02


def test_platt_parameters_are_close_to_the_generating_ones():
    s, y, _ = _synthetic(50000, seed=1)
    cal = fit_platt(s, y)
    assert cal.params["a"] == pytest.approx(12, rel=0.1) and cal.params["b"] == pytest.approx(-5, rel=0.1)


def test_isotonic_on_hand_made_data():
    cal = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1]))
    # (0.2, 1) and (0.3, 0) violate monotonicity and pool into one block of mean 0.5 at score 0.25
    assert cal.params["x"] == pytest.approx([0.1, 0.25, 0.4]) and cal.params["y"] == pytest.approx([0, 0.5, 1])
    assert cal(np.array([0.0, 0.25, 1.0])) == pytest.approx([0, 0.5, 1])


@pytest.mark.parametrize("fit", [fit_platt, fit_isotonic])
def test_round_trip_through_a_dict(fit):
    s, y, _ = _synthetic(2000)
    cal = fit(s, y)
    again = Calibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(again(s), cal(s))


@pytest.mark.parametrize("bad", [{"kind": "magic", "params": {}}, {"kind": "platt", "params": {"a": 1}},
                                 {"kind": "isotonic", "params": {"x": [0.2, 0.1], "y": [0, 1]}}, {}])
def test_malformed_calibration_is_refused(bad):
    with pytest.raises(BadInput):
        Calibration.from_dict(bad)


def test_fit_rejects_bad_labels():
    with pytest.raises(BadInput):
        fit_platt(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(BadInput):
        fit_isotonic(np.array([0.1]), np.array([]))


def test_encoder_carries_the_calibration_of_its_head_checkpoint(tmp_path, tiny_clip_spec):
    from retrieval.encoders import build_encoder
    from retrieval.heads import HeadConfig, HeadPair, save_heads

    cal = Calibration("platt", {"a": 10.0, "b": -4.0})
    ckpt = tmp_path / "h.pt"
    save_heads(HeadPair(HeadConfig(kind="residual", image_in=32, text_in=32, out_dim=32)), ckpt,
               extra={"calibration": cal.to_dict()})
    enc = build_encoder(tiny_clip_spec.model_copy(update={"heads": str(ckpt)}))
    assert enc.calibration == cal
    assert build_encoder(tiny_clip_spec).calibration is None
