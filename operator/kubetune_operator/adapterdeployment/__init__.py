"""The AdapterDeployment controller: a Deployment of serving replicas, its Service and the adapters
ConfigMap, and adapters loaded and unloaded on each ready replica through its HTTP API."""
