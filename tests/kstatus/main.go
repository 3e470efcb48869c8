// Reads a JSON list of objects on stdin, prints kstatus's reading (status.Compute) of each, one a line.
package main

import (
	"fmt"
	"io"
	"os"

	kjson "k8s.io/apimachinery/pkg/util/json"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	var objs []map[string]interface{}
	data, err := io.ReadAll(os.Stdin)
	if err == nil {
		err = kjson.Unmarshal(data, &objs) // numbers as int64, as the API machinery reads them
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for _, o := range objs {
		res, err := status.Compute(&unstructured.Unstructured{Object: o})
		if err != nil {
			fmt.Println("ERROR", err)
			continue
		}
		fmt.Println(res.Status)
	}
}
