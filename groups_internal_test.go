package pubsub

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

func TestSubsetSendsOnlyTheSharesMessages(t *testing.T) {
	data := [][]byte{[]byte("m0"), []byte("m1"), []byte("m2"), []byte("m3"), []byte("m4"), []byte("m5")}
	shares := []share{{local: "a@g", idx: []uint32{0, 3}}, {local: "b@g", idx: []uint32{4}}}
	for name, p := range map[string]payload{
		"publisher's slices": {msgs: msgBatch{data: data}, publisher: "n1"},
		"received, format 1": {packed: wire.Pack(nil, data), count: len(data), publisher: "n1"},
	} {
		t.Run(name, func(t *testing.T) {
			sub, moved, ok := p.subset(shares)
			require.True(t, ok)
			assert.Equal(t, [][]byte{[]byte("m0"), []byte("m3"), []byte("m4")}, sub.msgs.data)
			assert.Equal(t, []share{{local: "a@g", idx: []uint32{0, 1}}, {local: "b@g", idx: []uint32{2}}}, moved)
			assert.Equal(t, "n1", sub.publisher)
			msgs := sub.messages("t")
			assert.Equal(t, "m3", string(msgs[moved[0].idx[1]].Data))
		})
	}
	all := []share{{local: "a@g", idx: []uint32{0, 1, 2}}, {local: "b@g", idx: []uint32{3, 4, 5}}}
	_, _, ok := (&payload{msgs: msgBatch{data: data}}).subset(all)
	assert.False(t, ok, "every message: the whole batch goes as is")
	meta := wire.PackMeta(nil, data, make([]wire.Meta, len(data)))
	_, _, ok = (&payload{packed: meta, withMeta: true, count: len(data)}).subset(shares)
	assert.False(t, ok, "a received format 2 batch goes whole")
}
