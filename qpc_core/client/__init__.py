"""The qpc client SDK and the ``qpc-client`` command line."""

from qpc_core.client.sdk import ConnectionLost, ProofError, QpcClient, new_message_id

__all__ = ["ConnectionLost", "ProofError", "QpcClient", "new_message_id"]
