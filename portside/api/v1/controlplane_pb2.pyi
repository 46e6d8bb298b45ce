from portside.api.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeployRequest(_message.Message):
    __slots__ = ("config", "rollout")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    config: _types_pb2.Config
    rollout: str
    def __init__(self, config: _Optional[_Union[_types_pb2.Config, _Mapping]] = ..., rollout: _Optional[str] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("classes", "routes", "rollouts")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    classes: int
    routes: int
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    def __init__(self, classes: _Optional[int] = ..., routes: _Optional[int] = ..., rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("class_name", "node_id", "state")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    node_id: str
    state: str
    def __init__(self, class_name: _Optional[str] = ..., node_id: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_types_pb2.InstanceInfo]
    def __init__(self, instances: _Optional[_Iterable[_Union[_types_pb2.InstanceInfo, _Mapping]]] = ...) -> None: ...

class NodeHeartbeatRequest(_message.Message):
    __slots__ = ("node", "instances", "events", "usage", "usage_source", "usage_sequence", "fenced", "images", "images_changed")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    USAGE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FENCED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    node: _types_pb2.Node
    instances: _containers.RepeatedCompositeFieldContainer[_types_pb2.InstanceStatus]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    usage: _containers.RepeatedCompositeFieldContainer[_types_pb2.Usage]
    usage_source: str
    usage_sequence: int
    fenced: bool
    images: _containers.RepeatedScalarFieldContainer[str]
    images_changed: bool
    def __init__(self, node: _Optional[_Union[_types_pb2.Node, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[_types_pb2.InstanceStatus, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ..., usage: _Optional[_Iterable[_Union[_types_pb2.Usage, _Mapping]]] = ..., usage_source: _Optional[str] = ..., usage_sequence: _Optional[int] = ..., fenced: _Optional[bool] = ..., images: _Optional[_Iterable[str]] = ..., images_changed: _Optional[bool] = ...) -> None: ...

class NodeHeartbeatResponse(_message.Message):
    __slots__ = ("lease_ttl_seconds", "pool", "lease_confirmed", "store_unavailable", "reconciled", "elsewhere", "fence_after_seconds", "prefetch_images", "keep_images", "replace")
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    LEASE_CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    STORE_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RECONCILED_FIELD_NUMBER: _ClassVar[int]
    ELSEWHERE_FIELD_NUMBER: _ClassVar[int]
    FENCE_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_IMAGES_FIELD_NUMBER: _ClassVar[int]
    KEEP_IMAGES_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    lease_ttl_seconds: float
    pool: _containers.RepeatedCompositeFieldContainer[_types_pb2.PoolAssignment]
    lease_confirmed: bool
    store_unavailable: bool
    reconciled: bool
    elsewhere: _containers.RepeatedScalarFieldContainer[str]
    fence_after_seconds: float
    prefetch_images: _containers.RepeatedScalarFieldContainer[str]
    keep_images: ImageKeep
    replace: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_ttl_seconds: _Optional[float] = ..., pool: _Optional[_Iterable[_Union[_types_pb2.PoolAssignment, _Mapping]]] = ..., lease_confirmed: _Optional[bool] = ..., store_unavailable: _Optional[bool] = ..., reconciled: _Optional[bool] = ..., elsewhere: _Optional[_Iterable[str]] = ..., fence_after_seconds: _Optional[float] = ..., prefetch_images: _Optional[_Iterable[str]] = ..., keep_images: _Optional[_Union[ImageKeep, _Mapping]] = ..., replace: _Optional[_Iterable[str]] = ...) -> None: ...

class ImageKeep(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchRoutesRequest(_message.Message):
    __slots__ = ("since_revision",)
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    def __init__(self, since_revision: _Optional[int] = ...) -> None: ...

class RouteChange(_message.Message):
    __slots__ = ("kind", "node_id", "class_name", "instance_name")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[RouteChange.Kind]
        NODE_LOST: _ClassVar[RouteChange.Kind]
        INSTANCE_MOVED: _ClassVar[RouteChange.Kind]
        INSTANCE_REMOVED: _ClassVar[RouteChange.Kind]
    KIND_UNSPECIFIED: RouteChange.Kind
    NODE_LOST: RouteChange.Kind
    INSTANCE_MOVED: RouteChange.Kind
    INSTANCE_REMOVED: RouteChange.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    kind: RouteChange.Kind
    node_id: str
    class_name: str
    instance_name: str
    def __init__(self, kind: _Optional[_Union[RouteChange.Kind, str]] = ..., node_id: _Optional[str] = ..., class_name: _Optional[str] = ..., instance_name: _Optional[str] = ...) -> None: ...

class WatchRoutesResponse(_message.Message):
    __slots__ = ("reset", "live_nodes", "changes", "revision", "node_ttl_seconds")
    RESET_FIELD_NUMBER: _ClassVar[int]
    LIVE_NODES_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    NODE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    live_nodes: _containers.RepeatedScalarFieldContainer[str]
    changes: _containers.RepeatedCompositeFieldContainer[RouteChange]
    revision: int
    node_ttl_seconds: float
    def __init__(self, reset: _Optional[bool] = ..., live_nodes: _Optional[_Iterable[str]] = ..., changes: _Optional[_Iterable[_Union[RouteChange, _Mapping]]] = ..., revision: _Optional[int] = ..., node_ttl_seconds: _Optional[float] = ...) -> None: ...

class WatchPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchPoolsResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[_types_pb2.PoolMember]
    def __init__(self, members: _Optional[_Iterable[_Union[_types_pb2.PoolMember, _Mapping]]] = ...) -> None: ...

class ReportDemandRequest(_message.Message):
    __slots__ = ("edge_id", "region", "requests_per_second", "metrics_address")
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
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    region: str
    requests_per_second: _containers.ScalarMap[str, float]
    metrics_address: str
    def __init__(self, edge_id: _Optional[str] = ..., region: _Optional[str] = ..., requests_per_second: _Optional[_Mapping[str, float]] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class ReportDemandResponse(_message.Message):
    __slots__ = ("report_every_seconds",)
    REPORT_EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    report_every_seconds: float
    def __init__(self, report_every_seconds: _Optional[float] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("instance", "entrypoint", "env", "location_hint", "no_wait", "snapshot")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    LOCATION_HINT_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    location_hint: str
    no_wait: bool
    snapshot: str
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., entrypoint: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., location_hint: _Optional[str] = ..., no_wait: _Optional[bool] = ..., snapshot: _Optional[str] = ...) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _types_pb2.InstanceInfo
    def __init__(self, info: _Optional[_Union[_types_pb2.InstanceInfo, _Mapping]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("instance", "signal", "grace_seconds")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    signal: int
    grace_seconds: float
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., signal: _Optional[int] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _types_pb2.InstanceInfo
    def __init__(self, info: _Optional[_Union[_types_pb2.InstanceInfo, _Mapping]] = ...) -> None: ...

class SignalRequest(_message.Message):
    __slots__ = ("instance", "signal")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    signal: int
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., signal: _Optional[int] = ...) -> None: ...

class SignalResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DestroyRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ...) -> None: ...

class DestroyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ...) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _types_pb2.InstanceInfo
    def __init__(self, info: _Optional[_Union[_types_pb2.InstanceInfo, _Mapping]] = ...) -> None: ...

class RenewActivityRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ...) -> None: ...

class RenewActivityResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("class_name", "name", "after_revision")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_REVISION_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    name: str
    after_revision: int
    def __init__(self, class_name: _Optional[str] = ..., name: _Optional[str] = ..., after_revision: _Optional[int] = ...) -> None: ...

class GetStateValueRequest(_message.Message):
    __slots__ = ("instance", "key")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    key: str
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class GetStateValueResponse(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    def __init__(self, value: _Optional[bytes] = ...) -> None: ...

class PutStateValueRequest(_message.Message):
    __slots__ = ("instance", "key", "value")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    key: str
    value: bytes
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class PutStateValueResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteStateValueRequest(_message.Message):
    __slots__ = ("instance", "key")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    key: str
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class DeleteStateValueResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class ListClassesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClassesResponse(_message.Message):
    __slots__ = ("classes",)
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[_types_pb2.ContainerClass]
    def __init__(self, classes: _Optional[_Iterable[_Union[_types_pb2.ContainerClass, _Mapping]]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("class_name", "since")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    since: str
    def __init__(self, class_name: _Optional[str] = ..., since: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("usage",)
    USAGE_FIELD_NUMBER: _ClassVar[int]
    usage: _containers.RepeatedCompositeFieldContainer[_types_pb2.Usage]
    def __init__(self, usage: _Optional[_Iterable[_Union[_types_pb2.Usage, _Mapping]]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("role", "node_id", "csr")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    role: str
    node_id: str
    csr: bytes
    def __init__(self, role: _Optional[str] = ..., node_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("certificate", "ca_certificate", "not_after")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    ca_certificate: bytes
    not_after: float
    def __init__(self, certificate: _Optional[bytes] = ..., ca_certificate: _Optional[bytes] = ..., not_after: _Optional[float] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("id", "kind", "name", "role", "classes", "created", "expires")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    name: str
    role: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    created: float
    expires: float
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ..., role: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., created: _Optional[float] = ..., expires: _Optional[float] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("role", "classes", "ttl_seconds", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: float
    name: str
    def __init__(self, role: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "info")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    token: str
    info: TokenInfo
    def __init__(self, token: _Optional[str] = ..., info: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: TokenInfo
    def __init__(self, info: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class PushImageRequest(_message.Message):
    __slots__ = ("digest", "reference", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    reference: str
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., reference: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushImageResponse(_message.Message):
    __slots__ = ("digest", "size_bytes", "stored_bytes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size_bytes: int
    stored_bytes: int
    def __init__(self, digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ...) -> None: ...

class StatImagesRequest(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class StatImagesResponse(_message.Message):
    __slots__ = ("held",)
    HELD_FIELD_NUMBER: _ClassVar[int]
    held: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, held: _Optional[_Iterable[str]] = ...) -> None: ...

class PullImageRequest(_message.Message):
    __slots__ = ("digest", "have_chain_ids")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    HAVE_CHAIN_IDS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    have_chain_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digest: _Optional[str] = ..., have_chain_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PullImageResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("digest", "reference", "size_bytes", "classes", "replicas", "nodes", "pushed_at")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PUSHED_AT_FIELD_NUMBER: _ClassVar[int]
    digest: str
    reference: str
    size_bytes: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    replicas: _containers.RepeatedScalarFieldContainer[str]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    pushed_at: float
    def __init__(self, digest: _Optional[str] = ..., reference: _Optional[str] = ..., size_bytes: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., replicas: _Optional[_Iterable[str]] = ..., nodes: _Optional[_Iterable[str]] = ..., pushed_at: _Optional[float] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInfo]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInfo, _Mapping]]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("class_name",)
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    def __init__(self, class_name: _Optional[str] = ...) -> None: ...

class ClassVersion(_message.Message):
    __slots__ = ("number", "spec", "created_at", "changes", "instances")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    number: int
    spec: _types_pb2.ContainerClass
    created_at: float
    changes: _containers.RepeatedScalarFieldContainer[str]
    instances: int
    def __init__(self, number: _Optional[int] = ..., spec: _Optional[_Union[_types_pb2.ContainerClass, _Mapping]] = ..., created_at: _Optional[float] = ..., changes: _Optional[_Iterable[str]] = ..., instances: _Optional[int] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "current")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ClassVersion]
    current: int
    def __init__(self, versions: _Optional[_Iterable[_Union[ClassVersion, _Mapping]]] = ..., current: _Optional[int] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("class_name", "to_version", "from_versions", "mode", "steps", "step", "state", "reason", "started_at", "step_started_at", "instances", "updated", "healthy")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STEP_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    to_version: int
    from_versions: _containers.RepeatedScalarFieldContainer[int]
    mode: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    step: int
    state: str
    reason: str
    started_at: float
    step_started_at: float
    instances: int
    updated: int
    healthy: int
    def __init__(self, class_name: _Optional[str] = ..., to_version: _Optional[int] = ..., from_versions: _Optional[_Iterable[int]] = ..., mode: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., step: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., started_at: _Optional[float] = ..., step_started_at: _Optional[float] = ..., instances: _Optional[int] = ..., updated: _Optional[int] = ..., healthy: _Optional[int] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("class_name",)
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    def __init__(self, class_name: _Optional[str] = ...) -> None: ...

class GetRolloutResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class ControlRolloutRequest(_message.Message):
    __slots__ = ("class_name", "action")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    action: str
    def __init__(self, class_name: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class ControlRolloutResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("class_name", "version", "rollout")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    version: int
    rollout: str
    def __init__(self, class_name: _Optional[str] = ..., version: _Optional[int] = ..., rollout: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("instance", "name")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    name: str
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class CreateSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: _types_pb2.Snapshot
    def __init__(self, snapshot: _Optional[_Union[_types_pb2.Snapshot, _Mapping]] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("class_name", "instance_name")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    instance_name: str
    def __init__(self, class_name: _Optional[str] = ..., instance_name: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[_types_pb2.Snapshot]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[_types_pb2.Snapshot, _Mapping]]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("class_name", "snapshot")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    snapshot: str
    def __init__(self, class_name: _Optional[str] = ..., snapshot: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: _types_pb2.Snapshot
    def __init__(self, snapshot: _Optional[_Union[_types_pb2.Snapshot, _Mapping]] = ...) -> None: ...

class RecordSnapshotRequest(_message.Message):
    __slots__ = ("snapshot", "instance_id")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot: _types_pb2.Snapshot
    instance_id: str
    def __init__(self, snapshot: _Optional[_Union[_types_pb2.Snapshot, _Mapping]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class RecordSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: _types_pb2.Snapshot
    def __init__(self, snapshot: _Optional[_Union[_types_pb2.Snapshot, _Mapping]] = ...) -> None: ...

class LatestSnapshotRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ...) -> None: ...

class LatestSnapshotResponse(_message.Message):
    __slots__ = ("found", "snapshot")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    found: bool
    snapshot: _types_pb2.Snapshot
    def __init__(self, found: _Optional[bool] = ..., snapshot: _Optional[_Union[_types_pb2.Snapshot, _Mapping]] = ...) -> None: ...

class ScheduleRequest(_message.Message):
    __slots__ = ("instance", "at", "every_seconds", "path", "method", "command", "no_wake", "no_activity", "id")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    NO_WAKE_FIELD_NUMBER: _ClassVar[int]
    NO_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    at: float
    every_seconds: float
    path: str
    method: str
    command: _containers.RepeatedScalarFieldContainer[str]
    no_wake: bool
    no_activity: bool
    id: str
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., at: _Optional[float] = ..., every_seconds: _Optional[float] = ..., path: _Optional[str] = ..., method: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., no_wake: _Optional[bool] = ..., no_activity: _Optional[bool] = ..., id: _Optional[str] = ...) -> None: ...

class ScheduleInfo(_message.Message):
    __slots__ = ("id", "instance", "at", "every_seconds", "path", "method", "command", "no_wake", "no_activity", "created_at", "next_run", "last_run", "last_result", "runs")
    ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    NO_WAKE_FIELD_NUMBER: _ClassVar[int]
    NO_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_RUN_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_FIELD_NUMBER: _ClassVar[int]
    LAST_RESULT_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    id: str
    instance: _types_pb2.InstanceRef
    at: float
    every_seconds: float
    path: str
    method: str
    command: _containers.RepeatedScalarFieldContainer[str]
    no_wake: bool
    no_activity: bool
    created_at: float
    next_run: float
    last_run: float
    last_result: str
    runs: int
    def __init__(self, id: _Optional[str] = ..., instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., at: _Optional[float] = ..., every_seconds: _Optional[float] = ..., path: _Optional[str] = ..., method: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., no_wake: _Optional[bool] = ..., no_activity: _Optional[bool] = ..., created_at: _Optional[float] = ..., next_run: _Optional[float] = ..., last_run: _Optional[float] = ..., last_result: _Optional[str] = ..., runs: _Optional[int] = ...) -> None: ...

class ScheduleResponse(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: ScheduleInfo
    def __init__(self, schedule: _Optional[_Union[ScheduleInfo, _Mapping]] = ...) -> None: ...

class ListSchedulesRequest(_message.Message):
    __slots__ = ("class_name", "name")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    name: str
    def __init__(self, class_name: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListSchedulesResponse(_message.Message):
    __slots__ = ("schedules",)
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    schedules: _containers.RepeatedCompositeFieldContainer[ScheduleInfo]
    def __init__(self, schedules: _Optional[_Iterable[_Union[ScheduleInfo, _Mapping]]] = ...) -> None: ...

class DeleteScheduleRequest(_message.Message):
    __slots__ = ("instance", "id")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    id: str
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., id: _Optional[str] = ...) -> None: ...

class DeleteScheduleResponse(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: ScheduleInfo
    def __init__(self, schedule: _Optional[_Union[ScheduleInfo, _Mapping]] = ...) -> None: ...

class SecretInfo(_message.Message):
    __slots__ = ("name", "updated_at", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    updated_at: float
    digest: str
    def __init__(self, name: _Optional[str] = ..., updated_at: _Optional[float] = ..., digest: _Optional[str] = ...) -> None: ...

class PutSecretRequest(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class PutSecretResponse(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: SecretInfo
    def __init__(self, secret: _Optional[_Union[SecretInfo, _Mapping]] = ...) -> None: ...

class ListSecretsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSecretsResponse(_message.Message):
    __slots__ = ("secrets",)
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    secrets: _containers.RepeatedCompositeFieldContainer[SecretInfo]
    def __init__(self, secrets: _Optional[_Iterable[_Union[SecretInfo, _Mapping]]] = ...) -> None: ...

class DeleteSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSecretResponse(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: SecretInfo
    def __init__(self, secret: _Optional[_Union[SecretInfo, _Mapping]] = ...) -> None: ...

class WatchSecretsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchSecretsResponse(_message.Message):
    __slots__ = ("secrets",)
    class SecretsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    secrets: _containers.ScalarMap[str, str]
    def __init__(self, secrets: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RateCount(_message.Message):
    __slots__ = ("binding", "key", "period", "count")
    BINDING_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    binding: str
    key: str
    period: int
    count: int
    def __init__(self, binding: _Optional[str] = ..., key: _Optional[str] = ..., period: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class SyncRateLimitsRequest(_message.Message):
    __slots__ = ("edge_id", "counts")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    counts: _containers.RepeatedCompositeFieldContainer[RateCount]
    def __init__(self, edge_id: _Optional[str] = ..., counts: _Optional[_Iterable[_Union[RateCount, _Mapping]]] = ...) -> None: ...

class SyncRateLimitsResponse(_message.Message):
    __slots__ = ("totals", "sync_every_seconds")
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    SYNC_EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    totals: _containers.RepeatedCompositeFieldContainer[RateCount]
    sync_every_seconds: float
    def __init__(self, totals: _Optional[_Iterable[_Union[RateCount, _Mapping]]] = ..., sync_every_seconds: _Optional[float] = ...) -> None: ...

class SetOutboundRequest(_message.Message):
    __slots__ = ("instance", "policy", "clear")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    policy: _types_pb2.OutboundPolicy
    clear: bool
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ..., policy: _Optional[_Union[_types_pb2.OutboundPolicy, _Mapping]] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetOutboundResponse(_message.Message):
    __slots__ = ("policy", "own")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    OWN_FIELD_NUMBER: _ClassVar[int]
    policy: _types_pb2.OutboundPolicy
    own: bool
    def __init__(self, policy: _Optional[_Union[_types_pb2.OutboundPolicy, _Mapping]] = ..., own: _Optional[bool] = ...) -> None: ...

class GetOutboundRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.InstanceRef
    def __init__(self, instance: _Optional[_Union[_types_pb2.InstanceRef, _Mapping]] = ...) -> None: ...

class GetOutboundResponse(_message.Message):
    __slots__ = ("policy", "own")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    OWN_FIELD_NUMBER: _ClassVar[int]
    policy: _types_pb2.OutboundPolicy
    own: bool
    def __init__(self, policy: _Optional[_Union[_types_pb2.OutboundPolicy, _Mapping]] = ..., own: _Optional[bool] = ...) -> None: ...
