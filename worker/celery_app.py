"""The Celery application: broker settings for long GPU jobs (torch-free; the API imports it to
send tasks by name, the worker to run them)."""

from __future__ import annotations

from celery import Celery

from deltalens.worker.settings import Settings, get_settings

ANALYSIS_TASK = "deltalens.run_analysis"
PART_TASK = "deltalens.run_part"  # one shard group of a fanned-out analysis (pair, series, overlap)
MERGE_TASK = "deltalens.merge_parts"  # the chord's callback: parts -> one published artifact
MASK_TASK = "deltalens.export_mask"  # one update-mask file of a finished analysis


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("deltalens", broker=s.broker_url, backend=s.result_backend)
    # a message unacknowledged this long is handed out again: longer than any task may run
    transport = {"visibility_timeout": s.task_time_limit + max(30, s.task_time_limit // 10)}
    if s.broker_url.startswith("filesystem://"):
        queue_dir = str(s.path("broker"))
        transport.update(
            data_folder_in=queue_dir,
            data_folder_out=queue_dir,
            processed_folder=str(s.path("broker-done")),
            control_folder=str(s.path("broker-control")),
        )
    app.conf.update(
        task_default_queue=s.queue,
        task_routes={name: {"queue": s.queue} for name in (ANALYSIS_TASK, PART_TASK, MERGE_TASK, MASK_TASK)},
        task_acks_late=True,  # a task is acknowledged when it ends, not when it starts
        task_reject_on_worker_lost=True,  # ... so a killed worker's task goes back on the queue
        worker_prefetch_multiplier=1,  # one task at a time per worker process
        worker_concurrency=1,
        task_time_limit=s.task_time_limit,
        task_soft_time_limit=max(1, s.task_time_limit * 19 // 20),
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        result_extended=True,
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery()
