"""nodepass-service: tunnels (and masters) as systemd services, one module per job.

    cli        the usage (its docstring), the argument parser, the menu, main()
    commands   create, start/stop/restart, reload, status, list, delete
    install    install (venv or pyz), update, uninstall
    instance   what a unit must know of a URL, a tunnels file or a master URL
    units      the unit, drop-in and environment files, rendered as text
    checks     bad input refused before anything is written
    package    the package's own parsing (config, tunnelset), found and imported
    system     systemctl, useradd and userdel: run, or shown under --root
    files      atomic writes and removals
    layout     where things live: system paths and where --root puts them
    output     exit status, one-line errors, what the script prints

Runs on the host's python3 (3.6 on) before gevent is installed: nothing here
imports gevent, and this __init__ imports nothing.
"""
