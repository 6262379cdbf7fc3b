"""`registry daemon`: one long-running process per host that supervises worker pools and runs the services
that queue work by themselves (watch folders, follow, pipelines, schedules) and reports on all of it.

The daemon itself never runs a job: services only queue jobs (with a Trigger row, so nothing queues twice),
and the worker processes it supervises run them, as `registry worker` does.
"""
