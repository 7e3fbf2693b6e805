"""The service's Prometheus metrics, served at /metrics with BentoML's own."""

from __future__ import annotations

import bentoml

queue_depth = bentoml.metrics.Gauge(
    name="svd_queue_depth", documentation="Requests waiting for a GPU worker",
    multiprocess_mode="livesum")
rejected = bentoml.metrics.Counter(
    name="svd_rejected", documentation="Requests refused with 429 because the queue was full")
phase_seconds = bentoml.metrics.Histogram(
    name="svd_phase_seconds", documentation="Seconds per phase of a generation",
    labelnames=["phase"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
queue_wait_seconds = bentoml.metrics.Histogram(
    name="svd_queue_wait_seconds", documentation="Seconds a request waited for a GPU worker",
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
gpu_peak_bytes = bentoml.metrics.Gauge(
    name="svd_gpu_memory_peak_bytes", documentation="Peak GPU memory of the last generation",
    labelnames=["worker"], multiprocess_mode="mostrecent")
in_flight = bentoml.metrics.Gauge(
    name="svd_in_flight", documentation="Generations running on GPU workers",
    multiprocess_mode="livesum")
