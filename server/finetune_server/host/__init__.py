"""What this host has and allows: CPU policy and cgroups, devices and library versions, disk space, server info."""
