"""The kubetune operator: kopf handlers and the pure core they call, for FineTuneJob and AdapterDeployment."""
