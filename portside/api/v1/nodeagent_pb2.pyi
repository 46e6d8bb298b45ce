from portside.api.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentStartRequest(_message.Message):
    __slots__ = ("name", "entrypoint", "env", "no_wait", "snapshot", "outbound")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLASS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    OUTBOUND_FIELD_NUMBER: _ClassVar[int]
    name: str
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    no_wait: bool
    snapshot: _types_pb2.Snapshot
    outbound: _types_pb2.OutboundPolicy
    def __init__(self, name: _Optional[str] = ..., entrypoint: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., no_wait: _Optional[bool] = ..., snapshot: _Optional[_Union[_types_pb2.Snapshot, _Mapping]] = ..., outbound: _Optional[_Union[_types_pb2.OutboundPolicy, _Mapping]] = ..., **kwargs) -> None: ...

class AgentInstanceResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _types_pb2.InstanceInfo
    def __init__(self, info: _Optional[_Union[_types_pb2.InstanceInfo, _Mapping]] = ...) -> None: ...

class AgentStopRequest(_message.Message):
    __slots__ = ("instance_id", "signal", "grace_seconds")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    signal: int
    grace_seconds: float
    def __init__(self, instance_id: _Optional[str] = ..., signal: _Optional[int] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class AgentSignalRequest(_message.Message):
    __slots__ = ("instance_id", "signal")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    signal: int
    def __init__(self, instance_id: _Optional[str] = ..., signal: _Optional[int] = ...) -> None: ...

class AgentSignalResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentDestroyRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class AgentDestroyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentGetInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class AgentRenewActivityRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class AgentRenewActivityResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_types_pb2.InstanceStatus]
    def __init__(self, instances: _Optional[_Iterable[_Union[_types_pb2.InstanceStatus, _Mapping]]] = ...) -> None: ...

class StopInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class StopInstanceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentSnapshotRequest(_message.Message):
    __slots__ = ("instance_id", "name", "trigger")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    name: str
    trigger: str
    def __init__(self, instance_id: _Optional[str] = ..., name: _Optional[str] = ..., trigger: _Optional[str] = ...) -> None: ...

class AgentSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: _types_pb2.Snapshot
    def __init__(self, snapshot: _Optional[_Union[_types_pb2.Snapshot, _Mapping]] = ...) -> None: ...

class AgentCallRequest(_message.Message):
    __slots__ = ("name", "method", "path", "no_wake", "no_activity", "timeout_seconds")
    CLASS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    NO_WAKE_FIELD_NUMBER: _ClassVar[int]
    NO_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    method: str
    path: str
    no_wake: bool
    no_activity: bool
    timeout_seconds: float
    def __init__(self, name: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., no_wake: _Optional[bool] = ..., no_activity: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ..., **kwargs) -> None: ...

class AgentCallResponse(_message.Message):
    __slots__ = ("status", "body")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    status: int
    body: bytes
    def __init__(self, status: _Optional[int] = ..., body: _Optional[bytes] = ...) -> None: ...

class AgentSetOutboundRequest(_message.Message):
    __slots__ = ("class_name", "name", "policy")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    name: str
    policy: _types_pb2.OutboundPolicy
    def __init__(self, class_name: _Optional[str] = ..., name: _Optional[str] = ..., policy: _Optional[_Union[_types_pb2.OutboundPolicy, _Mapping]] = ...) -> None: ...

class AgentSetOutboundResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentAssignPoolRequest(_message.Message):
    __slots__ = ("assignment",)
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    assignment: _types_pb2.PoolAssignment
    def __init__(self, assignment: _Optional[_Union[_types_pb2.PoolAssignment, _Mapping]] = ...) -> None: ...

class AgentAssignPoolResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
