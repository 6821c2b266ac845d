"""Prometheus metrics: a leaf package (it imports nothing of the gateway but the
package root), split by what each module owns:

- ``vocabulary``: the metric name prefix, every label's closed vocabulary, TLS
  failure causes (``classify_tls_failure``) and ``LabelGuard``, which keeps label
  values inside them (anything else counts as ``other``);
- ``gateway``: ``GatewayMetrics``, one gateway's registry, its series and the verbs
  sessions call; ``REPORTED_ONCE``, what a worker leaves to the supervisor;
- ``scrapetime``: the gauges read from their owners (passive ports, bans, login
  queue, certificate expiry, hook queue), at scrape time in one process and
  published every ``PUBLISH_SECONDS`` by a worker;
- ``clusterseries``: a cluster node's Redis series;
- ``valuestore``: where this process's values live, in memory or in
  prometheus-client's multiprocess files (``keep_values_in``; decision 0012).

Import from the module that owns a name; this file re-exports nothing, so each
import says which responsibility it depends on. No pyftpdlib import; the HTTP side
is ``service.health``, the supervisor's reader of workers' files
``service.workermetrics``.
"""
