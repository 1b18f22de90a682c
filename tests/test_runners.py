"""Runners: tasks on greenlets reused from one task to the next.

Tests name a task's greenlet by a weak reference: a strong one would keep it from being reused.
"""
import contextvars
import weakref

import gevent
import gevent.local
import gevent.lock
import pytest
from gevent.event import Event

from flask_app.wire.runners import Runners

user = contextvars.ContextVar("user", default=None)


def current():
    return weakref.ref(gevent.getcurrent())


def test_a_task_after_another_runs_on_the_same_greenlet():
    runners, ran = Runners(), []
    runners.spawn(lambda n: ran.append((n, current())), 1)
    gevent.sleep(0.01)
    runners.spawn(lambda n: ran.append((n, current())), 2)
    gevent.sleep(0.01)
    assert [n for n, _ in ran] == [1, 2]
    assert ran[0][1] == ran[1][1]


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
        ran.append((n, current()))

    for n in range(5):
        runners.spawn(task, n)
    gevent.sleep(0.01)
    go.set()
    gevent.sleep(0.01)
    assert sorted(n for n, _ in ran) == [0, 1, 2, 3, 4]
    assert len({id(g) for _, g in ran}) == 5  # five weak references: five greenlets at once
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
        ran.append(current())
        raise ValueError("boom")

    runners.spawn(fail)
    gevent.sleep(0.01)
    runners.spawn(lambda: ran.append(current()))
    gevent.sleep(0.01)
    assert reported == [ValueError]
    assert len(ran) == 2 and ran[0] == ran[1]


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


def one_after_another(first, second):
    """Run `first` then `second` on a Runners as a worker would; return what each returned
    and the greenlets they ran on."""
    runners, results = Runners(), []

    def run(task):
        results.append((task(), current()))

    runners.spawn(run, first)
    gevent.sleep(0.01)
    runners.spawn(run, second)
    with gevent.Timeout(5):
        while len(results) < 2:
            gevent.sleep(0.01)
    return results


request_local = gevent.local.local()


def leave_a_local():
    request_local.user = "alice"


def leave_a_spawn_tree():
    gevent.spawn(lambda: gevent.getcurrent().spawn_tree_locals.update(user="alice")).join()


def leave_a_name():
    gevent.getcurrent().name = "alice's request"


def what_is_left():
    current = gevent.getcurrent()
    return (getattr(request_local, "user", None),
            getattr(current, "spawn_tree_locals", {}).get("user"), getattr(current, "name", None))


@pytest.mark.parametrize("leave", [leave_a_local, leave_a_spawn_tree, leave_a_name])
def test_what_a_task_leaves_on_its_greenlet_is_not_seen_by_the_next(leave):
    (_, first), (left, second) = one_after_another(leave, what_is_left)
    assert left == (None, None, None)
    assert first != second


def test_a_timeout_a_task_left_running_does_not_fire_in_the_next(monkeypatch):
    reported = []
    monkeypatch.setattr(gevent.get_hub(), "handle_error",
                        lambda context, kind, value, tb: reported.append(kind))

    def wait_past_it():
        gevent.sleep(0.1)
        return "finished"
    (_, first), (finished, second) = one_after_another(lambda: gevent.Timeout(0.05).start(),
                                                      wait_past_it)
    gevent.sleep(0.15)
    assert finished == "finished" and first != second
    assert reported == [gevent.Timeout]  # it fires where a fresh greenlet's would: nowhere


def test_a_lock_a_task_kept_is_not_the_next_tasks():
    lock = gevent.lock.RLock()
    (_, first), (taken, second) = one_after_another(lock.acquire,
                                                    lambda: lock.acquire(blocking=False))
    assert taken is False and first != second
