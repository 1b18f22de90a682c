"""Runners: tasks on greenlets reused from one task to the next."""
import contextvars

import gevent
from gevent.event import Event

from flask_app.runners import Runners

user = contextvars.ContextVar("user", default=None)


def test_a_task_after_another_runs_on_the_same_greenlet():
    runners, ran = Runners(), []
    runners.spawn(lambda n: ran.append((n, gevent.getcurrent())), 1)
    gevent.sleep(0.01)
    runners.spawn(lambda n: ran.append((n, gevent.getcurrent())), 2)
    gevent.sleep(0.01)
    assert [n for n, _ in ran] == [1, 2]
    assert ran[0][1] is ran[1][1]


def test_a_task_is_run_later_not_inside_spawn():
    runners, ran = Runners(), []
    runners.spawn(ran.append, 1)
    assert ran == []
    gevent.sleep(0.01)
    assert ran == [1]


def test_tasks_that_wait_run_side_by_side_and_at_most_keep_are_parked():
    runners, go, ran = Runners(keep=2), Event(), []

    def task(n):
        go.wait()
        ran.append((n, gevent.getcurrent()))

    for n in range(5):
        runners.spawn(task, n)
    gevent.sleep(0.01)
    go.set()
    gevent.sleep(0.01)
    assert sorted(n for n, _ in ran) == [0, 1, 2, 3, 4]
    assert len({g for _, g in ran}) == 5
    assert len(runners.idle) == 2


def test_each_task_starts_with_empty_context_variables():
    runners, seen = Runners(), []

    def first():
        user.set("alice")
        seen.append(user.get())

    runners.spawn(first)
    gevent.sleep(0.01)
    runners.spawn(lambda: seen.append(user.get()))
    gevent.sleep(0.01)
    assert seen == ["alice", None]


def test_a_failing_task_is_reported_and_its_greenlet_reused(monkeypatch):
    runners, reported, ran = Runners(), [], []
    monkeypatch.setattr(gevent.get_hub(), "handle_error",
                        lambda context, kind, value, tb: reported.append(kind))

    def fail():
        ran.append(gevent.getcurrent())
        raise ValueError("boom")

    runners.spawn(fail)
    gevent.sleep(0.01)
    runners.spawn(lambda: ran.append(gevent.getcurrent()))
    gevent.sleep(0.01)
    assert reported == [ValueError]
    assert len(ran) == 2 and ran[0] is ran[1]


def test_a_parked_greenlet_that_is_killed_is_not_handed_tasks():
    runners, ran = Runners(), []
    runners.spawn(lambda: None)
    gevent.sleep(0.01)
    [parked] = runners.idle
    gevent.kill(parked)
    gevent.sleep(0.01)
    assert runners.idle == [] and parked.dead
    runners.spawn(ran.append, "after")
    gevent.sleep(0.01)
    assert ran == ["after"]
