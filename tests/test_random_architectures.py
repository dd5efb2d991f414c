"""Random architectures (issue 7): hypothesis builds classifiers by hand (random_models.py); each
is converted and run on ONNX Runtime next to the original model.

- Any composite: the model converts, or is refused with UnsupportedOpError naming exactly the
  nodes that drew an attribute the converter refuses; the explainer's scores are the model's; the
  relevance is finite.
- Bias-free graphs under "epsilon" with ε = stabilizer = 1e-9 conserve: Σ R = logit within 1e-5
  of it (Bach et al. 2015: every unit hands on what it gets, less the share ε/(z + ε) its
  stabilizer takes).
- With biases, the residual logit − Σ R is exactly the relevance that the biases, stabilizers and
  Pad borders absorb, re-derived in numpy from each unit's z, b and R
  (random_models.absorbed_relevance), within 1e-4 of the logit.

Both conservation checks allow float32's rounding on top of their tolerance, which matters only
where the relevance grows far beyond the logit (random_models.ROUNDING), and skip samples whose
logit is within 1e-4 of 0 (random_models.LOGIT_FLOOR). Examples are
derandomized, so CI runs the same few hundred architectures every time; the thousands run in
benchmarks/random_architectures.py.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrp_onnx
from random_models import (ABSORPTION_TOLERANCE, BIAS_FREE_EPSILON, BIASED_EPSILONS, CONSERVATION_TOLERANCE,
                           FORWARD_TOLERANCE, classifiers, measure, measure_epsilon)

REPRODUCIBLE = settings(deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _forward_matches_and_finite(case, measurement):
    assert measurement.forward_deviation <= FORWARD_TOLERANCE, case.description
    assert measurement.finite, case.description


@settings(REPRODUCIBLE, max_examples=300)
@given(case=classifiers(allow_unsupported=True), composite=st.sampled_from(sorted(lrp_onnx.COMPOSITES)))
def test_converts_or_refuses_with_a_typed_error_then_runs(case, composite):
    try:
        measurement = measure(case, composite)
    except lrp_onnx.LrpOnnxError as error:
        assert case.unsupported, f"a supported architecture was refused: {type(error).__name__}: {error}"
        assert isinstance(error, lrp_onnx.UnsupportedOpError), error
        assert sorted(op for _, op, _ in error.nodes) == sorted(u.split()[0] for u in case.unsupported), error
        return
    assert not case.unsupported, f"converted although it has {case.unsupported}"
    _forward_matches_and_finite(case, measurement)


@settings(REPRODUCIBLE, max_examples=200)
@given(case=classifiers(biased=False))
def test_bias_free_graphs_conserve_under_epsilon(case):
    measurement = measure_epsilon(case, BIAS_FREE_EPSILON)
    _forward_matches_and_finite(case, measurement)
    errors = measurement.conservation_error
    assert (errors <= measurement.allowance(CONSERVATION_TOLERANCE)).all(), \
        f"|logit − Σ R| / |logit| = {errors} at amplification {measurement.amplification}"


@settings(REPRODUCIBLE, max_examples=200)
@given(case=classifiers(biased=True), epsilon=st.sampled_from(BIASED_EPSILONS))
def test_residual_is_what_biases_and_stabilizers_absorb(case, epsilon):
    measurement = measure_epsilon(case, epsilon)
    _forward_matches_and_finite(case, measurement)
    errors = measurement.absorption_error
    assert (errors <= measurement.allowance(ABSORPTION_TOLERANCE)).all(), \
        f"|residual − absorbed| / |logit| = {errors} at amplification {measurement.amplification}; " \
        f"residual {measurement.residual}, absorbed {measurement.absorbed[measurement.measured]}"
