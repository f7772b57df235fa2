"""The process-wide task identity that Flower's ``Message`` constructor reads."""

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


def claim_server_identity(run_id: int) -> None:
    """Make this process the server task of ``run_id``.

    ``flwr.app.Message(content, dst_node_id, message_type)`` fills its metadata from
    ``TaskIdentity`` (run id, source node, source task), which Flower's runtime sets
    when it launches a ServerApp process. An engine that runs a strategy outside
    that runtime must set it itself, or every strategy's ``configure_train`` fails
    with "TaskIdentity.run_id is not set".
    """
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 0
