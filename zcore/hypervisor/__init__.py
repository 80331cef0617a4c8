"""Protection in the hypervisor: a running VM's disk as a capture-only volume's source.

`QemuDisk` (zcore.hypervisor.qemu) tracks, reads and mirrors one block node of a running
QEMU over its QMP socket; `zcore.capture.ProtectedVolume(source=...)` captures what the
mirror writes.
"""

from zcore.hypervisor.qemu import MirrorState, QemuAddress, QemuDisk, QemuTarget

__all__ = ["MirrorState", "QemuAddress", "QemuDisk", "QemuTarget"]
