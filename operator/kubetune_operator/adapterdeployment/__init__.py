"""The AdapterDeployment controller: a Deployment of serving replicas, its Service, the adapters
ConfigMap, the replicas' admin-key Secret and NetworkPolicy, and adapters loaded and unloaded on
each ready replica through its HTTP API (bounded, with the admin key)."""
