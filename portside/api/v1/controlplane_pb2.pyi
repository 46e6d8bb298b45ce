from portside.api.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeployRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: _types_pb2.Config
    def __init__(self, config: _Optional[_Union[_types_pb2.Config, _Mapping]] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("classes", "routes")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    classes: int
    routes: int
    def __init__(self, classes: _Optional[int] = ..., routes: _Optional[int] = ...) -> None: ...

class GetConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConfigResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: _types_pb2.Config
    def __init__(self, config: _Optional[_Union[_types_pb2.Config, _Mapping]] = ...) -> None: ...

class WatchConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchConfigResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: _types_pb2.Config
    def __init__(self, config: _Optional[_Union[_types_pb2.Config, _Mapping]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("class_name", "instance_name", "location_hint")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    LOCATION_HINT_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    instance_name: str
    location_hint: str
    def __init__(self, class_name: _Optional[str] = ..., instance_name: _Optional[str] = ..., location_hint: _Optional[str] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("node_id", "data_address", "instance_id", "region", "placed", "instance_name")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    PLACED_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    data_address: str
    instance_id: str
    region: str
    placed: bool
    instance_name: str
    def __init__(self, node_id: _Optional[str] = ..., data_address: _Optional[str] = ..., instance_id: _Optional[str] = ..., region: _Optional[str] = ..., placed: _Optional[bool] = ..., instance_name: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node", "alive", "used_vcpu", "used_memory_mib", "instances")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    USED_VCPU_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    node: _types_pb2.Node
    alive: bool
    used_vcpu: float
    used_memory_mib: int
    instances: int
    def __init__(self, node: _Optional[_Union[_types_pb2.Node, _Mapping]] = ..., alive: _Optional[bool] = ..., used_vcpu: _Optional[float] = ..., used_memory_mib: _Optional[int] = ..., instances: _Optional[int] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("class_name",)
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    def __init__(self, class_name: _Optional[str] = ...) -> None: ...

class PlacedInstance(_message.Message):
    __slots__ = ("class_name", "name", "instance_id", "node_id", "placed_at")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PLACED_AT_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    name: str
    instance_id: str
    node_id: str
    placed_at: float
    def __init__(self, class_name: _Optional[str] = ..., name: _Optional[str] = ..., instance_id: _Optional[str] = ..., node_id: _Optional[str] = ..., placed_at: _Optional[float] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[PlacedInstance]
    def __init__(self, instances: _Optional[_Iterable[_Union[PlacedInstance, _Mapping]]] = ...) -> None: ...

class NodeHeartbeatRequest(_message.Message):
    __slots__ = ("node", "instances")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    node: _types_pb2.Node
    instances: _containers.RepeatedCompositeFieldContainer[_types_pb2.InstanceStatus]
    def __init__(self, node: _Optional[_Union[_types_pb2.Node, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[_types_pb2.InstanceStatus, _Mapping]]] = ...) -> None: ...

class NodeHeartbeatResponse(_message.Message):
    __slots__ = ("lease_ttl_seconds", "pool")
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    lease_ttl_seconds: float
    pool: _containers.RepeatedCompositeFieldContainer[_types_pb2.PoolAssignment]
    def __init__(self, lease_ttl_seconds: _Optional[float] = ..., pool: _Optional[_Iterable[_Union[_types_pb2.PoolAssignment, _Mapping]]] = ...) -> None: ...

class WatchPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchPoolsResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[_types_pb2.PoolMember]
    def __init__(self, members: _Optional[_Iterable[_Union[_types_pb2.PoolMember, _Mapping]]] = ...) -> None: ...

class ReportDemandRequest(_message.Message):
    __slots__ = ("edge_id", "region", "requests_per_second")
    class RequestsPerSecondEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    region: str
    requests_per_second: _containers.ScalarMap[str, float]
    def __init__(self, edge_id: _Optional[str] = ..., region: _Optional[str] = ..., requests_per_second: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportDemandResponse(_message.Message):
    __slots__ = ("report_every_seconds",)
    REPORT_EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    report_every_seconds: float
    def __init__(self, report_every_seconds: _Optional[float] = ...) -> None: ...
