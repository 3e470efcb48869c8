// The etcd binary, as etcd's own root main.go builds it. scripts/lib/common.sh (go_build_etcd)
// copies this file into a wrapper module that requires go.etcd.io/etcd/server/v3 at the wanted
// version; scripts/k8s-build.sh (the test control plane's etcd) and scripts/restricted/kind-images.sh
// (the etcd image of the kind node) both build it that way.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
