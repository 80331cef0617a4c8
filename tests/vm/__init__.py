"""Real-VM tests: a Debian kernel and a busybox guest booted by QEMU on zcore's exports."""
