from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceType(_message.Message):
    __slots__ = ("name", "vcpu", "memory_mib", "disk_mb")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VCPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    DISK_MB_FIELD_NUMBER: _ClassVar[int]
    name: str
    vcpu: float
    memory_mib: int
    disk_mb: int
    def __init__(self, name: _Optional[str] = ..., vcpu: _Optional[float] = ..., memory_mib: _Optional[int] = ..., disk_mb: _Optional[int] = ...) -> None: ...

class ContainerClass(_message.Message):
    __slots__ = ("name", "image", "default_port", "instance_type", "sleep_after_seconds", "max_instances", "env", "entrypoint", "enable_internet", "boot_timeout_seconds", "autoscaling", "image_digest", "ping_endpoint", "health_check_interval_seconds", "health_check_failures", "health_check_timeout_seconds", "version", "rollout_step_percentage", "rollout_active_grace_period_seconds", "rollout_health_deadline_seconds", "rollout_on_unhealthy", "stop_timeout_seconds", "wake_min_version", "sleep_mode", "pause_max_seconds", "snapshot_on_sleep", "snapshot_retention_seconds", "snapshot_keep", "binding", "allowed_hosts", "denied_hosts", "outbound_by_host", "intercept_https", "constraints")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class OutboundByHostEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PORT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SLEEP_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    ENABLE_INTERNET_FIELD_NUMBER: _ClassVar[int]
    BOOT_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PING_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_FAILURES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STEP_PERCENTAGE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ACTIVE_GRACE_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_HEALTH_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ON_UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    STOP_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAKE_MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SLEEP_MODE_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ON_SLEEP_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_RETENTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_KEEP_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_HOSTS_FIELD_NUMBER: _ClassVar[int]
    DENIED_HOSTS_FIELD_NUMBER: _ClassVar[int]
    OUTBOUND_BY_HOST_FIELD_NUMBER: _ClassVar[int]
    INTERCEPT_HTTPS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    image: str
    default_port: int
    instance_type: InstanceType
    sleep_after_seconds: float
    max_instances: int
    env: _containers.ScalarMap[str, str]
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    enable_internet: bool
    boot_timeout_seconds: float
    autoscaling: Autoscaling
    image_digest: str
    ping_endpoint: str
    health_check_interval_seconds: float
    health_check_failures: int
    health_check_timeout_seconds: float
    version: int
    rollout_step_percentage: _containers.RepeatedScalarFieldContainer[int]
    rollout_active_grace_period_seconds: float
    rollout_health_deadline_seconds: float
    rollout_on_unhealthy: str
    stop_timeout_seconds: float
    wake_min_version: int
    sleep_mode: str
    pause_max_seconds: float
    snapshot_on_sleep: bool
    snapshot_retention_seconds: float
    snapshot_keep: int
    binding: str
    allowed_hosts: _containers.RepeatedScalarFieldContainer[str]
    denied_hosts: _containers.RepeatedScalarFieldContainer[str]
    outbound_by_host: _containers.ScalarMap[str, str]
    intercept_https: bool
    constraints: Constraints
    def __init__(self, name: _Optional[str] = ..., image: _Optional[str] = ..., default_port: _Optional[int] = ..., instance_type: _Optional[_Union[InstanceType, _Mapping]] = ..., sleep_after_seconds: _Optional[float] = ..., max_instances: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., entrypoint: _Optional[_Iterable[str]] = ..., enable_internet: _Optional[bool] = ..., boot_timeout_seconds: _Optional[float] = ..., autoscaling: _Optional[_Union[Autoscaling, _Mapping]] = ..., image_digest: _Optional[str] = ..., ping_endpoint: _Optional[str] = ..., health_check_interval_seconds: _Optional[float] = ..., health_check_failures: _Optional[int] = ..., health_check_timeout_seconds: _Optional[float] = ..., version: _Optional[int] = ..., rollout_step_percentage: _Optional[_Iterable[int]] = ..., rollout_active_grace_period_seconds: _Optional[float] = ..., rollout_health_deadline_seconds: _Optional[float] = ..., rollout_on_unhealthy: _Optional[str] = ..., stop_timeout_seconds: _Optional[float] = ..., wake_min_version: _Optional[int] = ..., sleep_mode: _Optional[str] = ..., pause_max_seconds: _Optional[float] = ..., snapshot_on_sleep: _Optional[bool] = ..., snapshot_retention_seconds: _Optional[float] = ..., snapshot_keep: _Optional[int] = ..., binding: _Optional[str] = ..., allowed_hosts: _Optional[_Iterable[str]] = ..., denied_hosts: _Optional[_Iterable[str]] = ..., outbound_by_host: _Optional[_Mapping[str, str]] = ..., intercept_https: _Optional[bool] = ..., constraints: _Optional[_Union[Constraints, _Mapping]] = ...) -> None: ...

class Constraints(_message.Message):
    __slots__ = ("regions", "jurisdiction", "jurisdiction_regions", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    JURISDICTION_FIELD_NUMBER: _ClassVar[int]
    JURISDICTION_REGIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedScalarFieldContainer[str]
    jurisdiction: str
    jurisdiction_regions: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, regions: _Optional[_Iterable[str]] = ..., jurisdiction: _Optional[str] = ..., jurisdiction_regions: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class OutboundPolicy(_message.Message):
    __slots__ = ("enable_internet", "allowed_hosts", "denied_hosts", "outbound_by_host", "intercept_https")
    class OutboundByHostEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENABLE_INTERNET_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_HOSTS_FIELD_NUMBER: _ClassVar[int]
    DENIED_HOSTS_FIELD_NUMBER: _ClassVar[int]
    OUTBOUND_BY_HOST_FIELD_NUMBER: _ClassVar[int]
    INTERCEPT_HTTPS_FIELD_NUMBER: _ClassVar[int]
    enable_internet: bool
    allowed_hosts: _containers.RepeatedScalarFieldContainer[str]
    denied_hosts: _containers.RepeatedScalarFieldContainer[str]
    outbound_by_host: _containers.ScalarMap[str, str]
    intercept_https: bool
    def __init__(self, enable_internet: _Optional[bool] = ..., allowed_hosts: _Optional[_Iterable[str]] = ..., denied_hosts: _Optional[_Iterable[str]] = ..., outbound_by_host: _Optional[_Mapping[str, str]] = ..., intercept_https: _Optional[bool] = ...) -> None: ...

class Autoscaling(_message.Message):
    __slots__ = ("minimum_instances", "maximum_instances", "cpu_target", "scale_down_delay_seconds", "concurrency_limit")
    MINIMUM_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    CPU_TARGET_FIELD_NUMBER: _ClassVar[int]
    SCALE_DOWN_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    minimum_instances: int
    maximum_instances: int
    cpu_target: float
    scale_down_delay_seconds: float
    concurrency_limit: int
    def __init__(self, minimum_instances: _Optional[int] = ..., maximum_instances: _Optional[int] = ..., cpu_target: _Optional[float] = ..., scale_down_delay_seconds: _Optional[float] = ..., concurrency_limit: _Optional[int] = ...) -> None: ...

class InstanceSource(_message.Message):
    __slots__ = ("kind", "name", "index")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    index: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("path", "class_name", "instance", "gateway")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    path: str
    class_name: str
    instance: InstanceSource
    gateway: bool
    def __init__(self, path: _Optional[str] = ..., class_name: _Optional[str] = ..., instance: _Optional[_Union[InstanceSource, _Mapping]] = ..., gateway: _Optional[bool] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("binding", "limit", "period_seconds")
    BINDING_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    binding: str
    limit: int
    period_seconds: float
    def __init__(self, binding: _Optional[str] = ..., limit: _Optional[int] = ..., period_seconds: _Optional[float] = ...) -> None: ...

class Gateway(_message.Message):
    __slots__ = ("module", "source", "digest", "vars", "rate_limits", "deadline_seconds")
    class VarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODULE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    VARS_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    module: str
    source: str
    digest: str
    vars: _containers.ScalarMap[str, str]
    rate_limits: _containers.RepeatedCompositeFieldContainer[RateLimit]
    deadline_seconds: float
    def __init__(self, module: _Optional[str] = ..., source: _Optional[str] = ..., digest: _Optional[str] = ..., vars: _Optional[_Mapping[str, str]] = ..., rate_limits: _Optional[_Iterable[_Union[RateLimit, _Mapping]]] = ..., deadline_seconds: _Optional[float] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("classes", "routes", "gateway")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[ContainerClass]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    gateway: Gateway
    def __init__(self, classes: _Optional[_Iterable[_Union[ContainerClass, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., gateway: _Optional[_Union[Gateway, _Mapping]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("id", "data_address", "api_address", "region", "latitude", "longitude", "vcpu", "memory_mib", "labels", "metrics_address")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    API_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    VCPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    id: str
    data_address: str
    api_address: str
    region: str
    latitude: float
    longitude: float
    vcpu: float
    memory_mib: int
    labels: _containers.ScalarMap[str, str]
    metrics_address: str
    def __init__(self, id: _Optional[str] = ..., data_address: _Optional[str] = ..., api_address: _Optional[str] = ..., region: _Optional[str] = ..., latitude: _Optional[float] = ..., longitude: _Optional[float] = ..., vcpu: _Optional[float] = ..., memory_mib: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class InstanceStatus(_message.Message):
    __slots__ = ("info", "cpu_percent", "memory_bytes")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    info: InstanceInfo
    cpu_percent: float
    memory_bytes: int
    def __init__(self, info: _Optional[_Union[InstanceInfo, _Mapping]] = ..., cpu_percent: _Optional[float] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class PoolAssignment(_message.Message):
    __slots__ = ("class_name", "name", "instance_id", "draining")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    name: str
    instance_id: str
    draining: bool
    def __init__(self, class_name: _Optional[str] = ..., name: _Optional[str] = ..., instance_id: _Optional[str] = ..., draining: _Optional[bool] = ...) -> None: ...

class PoolMember(_message.Message):
    __slots__ = ("class_name", "name", "instance_id", "node_id", "data_address", "region", "latitude", "longitude", "draining", "ready")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    name: str
    instance_id: str
    node_id: str
    data_address: str
    region: str
    latitude: float
    longitude: float
    draining: bool
    ready: bool
    def __init__(self, class_name: _Optional[str] = ..., name: _Optional[str] = ..., instance_id: _Optional[str] = ..., node_id: _Optional[str] = ..., data_address: _Optional[str] = ..., region: _Optional[str] = ..., latitude: _Optional[float] = ..., longitude: _Optional[float] = ..., draining: _Optional[bool] = ..., ready: _Optional[bool] = ...) -> None: ...

class InstanceRef(_message.Message):
    __slots__ = ("class_name", "name")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    name: str
    def __init__(self, class_name: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("class_name", "name", "instance_id", "state", "exit_code", "node_id", "region", "since", "pool", "in_flight", "backoff_until", "restarts", "version")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_UNTIL_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    name: str
    instance_id: str
    state: str
    exit_code: int
    node_id: str
    region: str
    since: float
    pool: bool
    in_flight: int
    backoff_until: float
    restarts: int
    version: int
    def __init__(self, class_name: _Optional[str] = ..., name: _Optional[str] = ..., instance_id: _Optional[str] = ..., state: _Optional[str] = ..., exit_code: _Optional[int] = ..., node_id: _Optional[str] = ..., region: _Optional[str] = ..., since: _Optional[float] = ..., pool: _Optional[bool] = ..., in_flight: _Optional[int] = ..., backoff_until: _Optional[float] = ..., restarts: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("revision", "time", "kind", "class_name", "name", "instance_id", "node_id", "exit_code", "signal", "reason")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    revision: int
    time: float
    kind: str
    class_name: str
    name: str
    instance_id: str
    node_id: str
    exit_code: int
    signal: int
    reason: str
    def __init__(self, revision: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., class_name: _Optional[str] = ..., name: _Optional[str] = ..., instance_id: _Optional[str] = ..., node_id: _Optional[str] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ExecStart(_message.Message):
    __slots__ = ("instance", "command", "env", "working_dir", "stdin", "tty", "size", "user", "wake", "activity")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    WAKE_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceRef
    command: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir: str
    stdin: bool
    tty: bool
    size: TerminalSize
    user: str
    wake: bool
    activity: bool
    def __init__(self, instance: _Optional[_Union[InstanceRef, _Mapping]] = ..., command: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., stdin: _Optional[bool] = ..., tty: _Optional[bool] = ..., size: _Optional[_Union[TerminalSize, _Mapping]] = ..., user: _Optional[str] = ..., wake: _Optional[bool] = ..., activity: _Optional[bool] = ...) -> None: ...

class TerminalSize(_message.Message):
    __slots__ = ("rows", "cols")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("start", "stdin", "stdin_close", "resize")
    START_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_CLOSE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    start: ExecStart
    stdin: bytes
    stdin_close: bool
    resize: TerminalSize
    def __init__(self, start: _Optional[_Union[ExecStart, _Mapping]] = ..., stdin: _Optional[bytes] = ..., stdin_close: _Optional[bool] = ..., resize: _Optional[_Union[TerminalSize, _Mapping]] = ...) -> None: ...

class ExecResponse(_message.Message):
    __slots__ = ("stdout", "stderr", "exit_code")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    stdout: bytes
    stderr: bytes
    exit_code: int
    def __init__(self, stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., exit_code: _Optional[int] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("instance", "follow", "tail")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceRef
    follow: bool
    tail: int
    def __init__(self, instance: _Optional[_Union[InstanceRef, _Mapping]] = ..., follow: _Optional[bool] = ..., tail: _Optional[int] = ...) -> None: ...

class LogsResponse(_message.Message):
    __slots__ = ("stdout", "stderr")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    stdout: bytes
    stderr: bytes
    def __init__(self, stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("class_name", "day", "instance_id", "running_ms", "vcpu_seconds", "memory_gib_seconds", "disk_gb_seconds", "cpu_seconds_used", "egress_bytes")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MS_FIELD_NUMBER: _ClassVar[int]
    VCPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GIB_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DISK_GB_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_USED_FIELD_NUMBER: _ClassVar[int]
    EGRESS_BYTES_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    day: str
    instance_id: str
    running_ms: int
    vcpu_seconds: float
    memory_gib_seconds: float
    disk_gb_seconds: float
    cpu_seconds_used: float
    egress_bytes: int
    def __init__(self, class_name: _Optional[str] = ..., day: _Optional[str] = ..., instance_id: _Optional[str] = ..., running_ms: _Optional[int] = ..., vcpu_seconds: _Optional[float] = ..., memory_gib_seconds: _Optional[float] = ..., disk_gb_seconds: _Optional[float] = ..., cpu_seconds_used: _Optional[float] = ..., egress_bytes: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("id", "name", "class_name", "instance_name", "digest", "reference", "image_digest", "version", "layer_bytes", "created_at", "expires_at", "trigger")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    class_name: str
    instance_name: str
    digest: str
    reference: str
    image_digest: str
    version: int
    layer_bytes: int
    created_at: float
    expires_at: float
    trigger: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., class_name: _Optional[str] = ..., instance_name: _Optional[str] = ..., digest: _Optional[str] = ..., reference: _Optional[str] = ..., image_digest: _Optional[str] = ..., version: _Optional[int] = ..., layer_bytes: _Optional[int] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., trigger: _Optional[str] = ...) -> None: ...
