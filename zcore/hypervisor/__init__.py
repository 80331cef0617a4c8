"""Protection in the hypervisor: a running VM's disk as a capture-only volume's source.

`QemuDisk` (zcore.hypervisor.qemu) tracks, reads and mirrors one block node of a running
QEMU over its QMP socket (`probe_node` tells whether one can be, and its size);
`zcore.capture.ProtectedVolume(source=...)` captures what the mirror writes.
"""

from zcore.hypervisor.qemu import (
    MirrorState,
    NodeInfo,
    QemuAddress,
    QemuDisk,
    QemuTarget,
    probe_node,
)

__all__ = ["MirrorState", "NodeInfo", "QemuAddress", "QemuDisk", "QemuTarget", "probe_node"]
