"""Load predictors: feed observations, ask for the value at future times. Pure: no I/O, no clock
(time is an argument), deterministic.

* ``constant``: the last observation (a reactive planner).
* ``moving_average``: the mean over the last ``window_s``.
* ``holt``: additive, damped trend (statsmodels' ``ExponentialSmoothing``) fitted on per-bucket
  means over the last ``window_s``: follows ramps.
* ``holt_winters``: trend plus a seasonal cycle of ``season_s`` (a day), once two cycles of
  history are in; until then it is ``holt`` and says so.

Fitting the smoothing parameters is an optimisation (~0.1 s); it runs every ``refit_buckets``
buckets and otherwise the model is re-run with the last parameters (~ms).
"""

from __future__ import annotations

import math
import statistics
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence

import numpy as np

from serving.planner.config import PredictorConfig


class Predictor(ABC):
    name: str = "predictor"

    @abstractmethod
    def observe(self, time_s: float, value: float) -> None: ...

    @abstractmethod
    def forecast(
        self, time_s: float, horizons_s: Sequence[float], quantile: float | None = None
    ) -> list[float]:
        """Predicted values at ``time_s + h`` for each ``h`` (never negative). With
        ``quantile``, the upper end of the prediction interval where the predictor has one
        (Holt: it widens with the horizon); the point forecast otherwise."""

    @property
    def mode(self) -> str:
        """What the predictor currently does (for the decision's reason)."""
        return self.name


class ConstantPredictor(Predictor):
    name = "constant"

    def __init__(self) -> None:
        self.last: float | None = None

    def observe(self, time_s: float, value: float) -> None:
        self.last = value

    def forecast(
        self, time_s: float, horizons_s: Sequence[float], quantile: float | None = None
    ) -> list[float]:
        return [max(self.last or 0.0, 0.0)] * len(horizons_s)


class MovingAveragePredictor(Predictor):
    name = "moving_average"

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, float]] = deque()

    def observe(self, time_s: float, value: float) -> None:
        self.samples.append((time_s, value))
        while self.samples and self.samples[0][0] < time_s - self.window_s:
            self.samples.popleft()

    def forecast(
        self, time_s: float, horizons_s: Sequence[float], quantile: float | None = None
    ) -> list[float]:
        if not self.samples:
            return [0.0] * len(horizons_s)
        mean = sum(v for _, v in self.samples) / len(self.samples)
        return [max(mean, 0.0)] * len(horizons_s)


class _BucketedPredictor(Predictor):
    """Averages observations per ``bucket_s``; subclasses forecast from completed buckets."""

    min_buckets = 4
    refit_buckets = 15

    def __init__(self, config: PredictorConfig, max_buckets: int) -> None:
        self.bucket_s = config.bucket_s
        self.damped = config.damped_trend
        self.buckets: deque[float] = deque(maxlen=max_buckets)
        self._bucket: int | None = None  # index of the bucket being filled
        self._sum = 0.0
        self._count = 0
        self._last = 0.0
        self._params: dict[str, float] | None = None
        self._since_fit = 0
        self._cache: tuple[int, np.ndarray] | None = None
        self._sigma = 0.0  # std of the one-step-ahead errors of the last fit

    def observe(self, time_s: float, value: float) -> None:
        index = math.floor(time_s / self.bucket_s)
        if self._bucket is not None and index != self._bucket:
            self.buckets.append(self._sum / self._count)
            self._since_fit += 1
            # Buckets without an observation (a stalled source) repeat the last mean.
            for _ in range(min(index - self._bucket - 1, self.buckets.maxlen or 0)):
                self.buckets.append(self.buckets[-1])
            self._sum, self._count = 0.0, 0
        self._bucket = index
        self._sum += value
        self._count += 1
        self._last = value

    def forecast(
        self, time_s: float, horizons_s: Sequence[float], quantile: float | None = None
    ) -> list[float]:
        if len(self.buckets) < self.min_buckets or self._bucket is None:
            return [max(self._last, 0.0)] * len(horizons_s)
        # The last completed bucket ends where the current one starts.
        last_end_s = self._bucket * self.bucket_s
        steps = [(time_s + h - last_end_s) / self.bucket_s + 0.5 for h in horizons_s]
        path = self._path(max(1, math.ceil(max(steps))))
        points = [float(np.interp(s, np.arange(1, len(path) + 1), path)) for s in steps]
        if quantile is not None:
            z = statistics.NormalDist().inv_cdf(quantile)
            points = [
                p + z * self._sigma * self._spread(s) for p, s in zip(points, steps, strict=True)
            ]
        return [max(p, 0.0) for p in points]

    def _spread(self, steps: float) -> float:
        """The h-step forecast error's std over the one-step one, for Holt's linear method
        (Hyndman & Athanasopoulos, FPP3 table 8.8): sqrt(1 + (h-1)(a^2 + a*b*h + b^2*h(2h-1)/6));
        the damped trend's is slightly narrower."""
        params = self._params or {}
        a = params.get("smoothing_level", 0.5)
        b = a * params.get("smoothing_trend", 0.0)  # ETS beta = alpha * statsmodels' beta*
        h = max(steps, 1.0)
        return math.sqrt(1 + (h - 1) * (a * a + a * b * h + b * b * h * (2 * h - 1) / 6))

    def _path(self, num_steps: int) -> np.ndarray:
        # The completed buckets change only when a new bucket starts: one fit per bucket,
        # whatever the number of forecasts (a refit between two calls would re-estimate the
        # initial state and move the path).
        key = self._bucket or 0
        if self._cache is not None and self._cache[0] == key and len(self._cache[1]) >= num_steps:
            return self._cache[1][:num_steps]
        path = self._fit_forecast(np.asarray(self.buckets, dtype=np.float64), num_steps)
        self._cache = (key, path)
        return path

    @abstractmethod
    def _fit_forecast(self, values: np.ndarray, num_steps: int) -> np.ndarray: ...

    def _smooth(self, model_kwargs: dict, values: np.ndarray, num_steps: int) -> np.ndarray:
        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on short noisy windows
            model = ExponentialSmoothing(values, initialization_method="estimated", **model_kwargs)
            if self._params is None or self._since_fit >= self.refit_buckets:
                fitted = model.fit()
                self._params = {
                    k: float(fitted.params[k])
                    for k in ("smoothing_level", "smoothing_trend", "damping_trend")
                    if fitted.params.get(k) is not None and not np.isnan(fitted.params[k])
                }
                self._since_fit = 0
            else:
                fitted = model.fit(**self._params, optimized=False)
            residuals = np.asarray(fitted.resid, dtype=np.float64)
            self._sigma = float(np.std(residuals[1:])) if len(residuals) > 2 else 0.0
            return np.asarray(fitted.forecast(num_steps), dtype=np.float64)


class HoltPredictor(_BucketedPredictor):
    name = "holt"

    def _fit_forecast(self, values: np.ndarray, num_steps: int) -> np.ndarray:
        if np.ptp(values) == 0:  # a flat history: nothing to fit
            return np.full(num_steps, values[-1])
        kwargs = {"trend": "add", "damped_trend": self.damped}
        return self._smooth(kwargs, values, num_steps)


class HoltWintersPredictor(_BucketedPredictor):
    name = "holt_winters"

    def __init__(self, config: PredictorConfig) -> None:
        self.periods = max(2, round(config.season_s / config.bucket_s))
        super().__init__(config, max_buckets=3 * self.periods)

    @property
    def mode(self) -> str:
        if len(self.buckets) < 2 * self.periods:
            return f"holt_winters (holt until {2 * self.periods} buckets of history)"
        return self.name

    def _fit_forecast(self, values: np.ndarray, num_steps: int) -> np.ndarray:
        if np.ptp(values) == 0:
            return np.full(num_steps, values[-1])
        kwargs: dict = {"trend": "add", "damped_trend": self.damped}
        if len(values) >= 2 * self.periods:
            kwargs |= {"seasonal": "add", "seasonal_periods": self.periods}
        return self._smooth(kwargs, values, num_steps)


def make_predictor(config: PredictorConfig) -> Predictor:
    if config.kind == "constant":
        return ConstantPredictor()
    if config.kind == "moving_average":
        return MovingAveragePredictor(config.window_s)
    if config.kind == "holt":
        return HoltPredictor(config, max_buckets=max(4, round(config.window_s / config.bucket_s)))
    return HoltWintersPredictor(config)
