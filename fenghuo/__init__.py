"""fenghuo (烽火): an instant-messaging relay.

The client API::

    import fenghuo

    async with fenghuo.connect("tcp://127.0.0.1:7700", token=token) as client:
        await client.send("bob", "hello")
"""

from fenghuo.channels import direct_channel, group_channel
from fenghuo.client import Client, ConnectionLost, FenghuoError, SlowConsumer, connect
from fenghuo.core import Ack, ContentType, ErrorCode, Message, Receipt, ReceiptKind
from fenghuo.tokens import issue_token

__version__ = "0.1.0"
__all__ = [
    "Ack", "Client", "ConnectionLost", "ContentType", "ErrorCode", "FenghuoError", "Message",
    "Receipt", "ReceiptKind", "SlowConsumer", "connect", "direct_channel", "group_channel", "issue_token",
]
