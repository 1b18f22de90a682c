"""The tests' own Socket.IO client: events of one connection are handled in the order sent."""
import threading
import time

from engineio import packet

from conftest import InOrderEngineIOClient


def test_messages_are_handled_in_the_order_they_arrived():
    """python-engineio's client hands each message to a thread of its own (`_trigger_event` with
    run_async): a slow first handler would let the second overtake it. Ours must not."""
    client = InOrderEngineIOClient()
    handled = []
    done = threading.Event()

    def on_message(data):
        if data == "0":
            time.sleep(0.2)  # the first handler is slow: a thread per message lets others pass
        handled.append(data)
        if len(handled) == 20:
            done.set()
    client.on("message", on_message)
    for n in range(20):
        client._receive_packet(packet.Packet(packet.MESSAGE, data=str(n)))
    assert done.wait(10), handled
    assert handled == [str(n) for n in range(20)]
