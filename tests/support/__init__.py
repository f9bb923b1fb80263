"""What the tests share: clients, waits, probes, proxies, processes and stacks."""
