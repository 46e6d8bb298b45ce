from portside.api.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
