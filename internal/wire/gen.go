// Package wire holds the protobuf messages that nodes exchange over NATS.
// The generated code is committed, so neither users nor CI need a protobuf
// compiler. `go generate ./internal/wire` remakes it with buf (a protobuf
// compiler written in Go) and protoc-gen-go, both fetched from the Go module
// proxy at pinned versions: no protoc needed.
package wire

//go:generate go run github.com/bufbuild/buf/cmd/buf@v1.75.0 generate
