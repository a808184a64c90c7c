"""The README's two-terminal chat, through the Python client."""



async def test_direct_message_reaches_the_other_user(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    ack = await alice.send("bob", "hello bob")
    assert ack.channel == "dm:alice:bob" and ack.seq == 1
    message = await bob.next_message(timeout=5)
    assert (message.channel, message.seq, message.sender, message.text) == (
        "dm:alice:bob", 1, "alice", "hello bob")
