package main

import (
	"bytes"
	"fmt"
	"log"
	"math/rand"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// taskDelayer makes the tasks of selected methods asynchronous (-task-delay).
//
// In govmomi 0.24, a method creates its task with simulator.CreateTask and calls Task.Run(),
// which sets the task running, calls Task.Execute and publishes success/error (Map.Update)
// before the SOAP response is written. Run always publishes the outcome of Execute, so the
// task object that Run works on cannot be the one clients see. For a delayed call:
//
//  1. The front handler arms the request's goroutine before passing the call to vcsim.
//  2. PutObject (a Registry handler, called from CreateTask in that goroutine) wraps the
//     Execute func of the first task the call creates.
//  3. When Run calls the wrapper, the task is running. The wrapper registers a copy of it
//     under the task's moref (the public task, cancelable, progress 0) and renames the
//     original (a private moref nobody has a filter on), so that Run's "success" goes nowhere.
//  4. Run returns the private moref; the front handler puts the public one into the response.
//  5. A goroutine raises info.progress over the delay, then runs the real Execute with the
//     lock the dispatcher would have held (the method's _this), and publishes the outcome on
//     the public task. CancelTask before that point ends the task with RequestCanceled and
//     the operation never runs.
//
// Calls that do not come through the front handler (the wrapper's own in-process client) and
// tasks created while a task executes (e.g. CloneVM_Task's inner CreateVM_Task) are not delayed.
type taskDelayer struct {
	self   types.ManagedObjectReference
	delays map[string]int // method -> ms ("*": every *_Task method)
	jitter float64

	mu    sync.Mutex
	armed map[uint64]*delayArm                          // by goroutine id
	tasks map[types.ManagedObjectReference]*delayedTask // by public task moref
}

// taskExecute is the signature of simulator.Task.Execute.
type taskExecute func(*simulator.Task) (types.AnyType, types.BaseMethodFault)

// delayArm is one SOAP call in flight whose task is delayed (delay > 0) and/or wrapped.
type delayArm struct {
	method string
	this   types.ManagedObjectReference
	delay  int // ms, before jitter; 0: the task runs synchronously as usual
	gid    uint64

	// around, if set, runs the task's work (calling execute) with the method's _this locked,
	// as vcsim runs Execute.
	around func(execute taskExecute, t *simulator.Task) (types.AnyType, types.BaseMethodFault)
	// after, if set, runs after a delayed task's work, without any lock, before the task
	// reports its outcome.
	after func(types.AnyType, types.BaseMethodFault)

	claimed bool         // the call created its task (under taskDelayer.mu)
	task    *delayedTask // set once the task was detached (same goroutine as the call)
}

const (
	taskPending = iota
	taskExecuting
	taskDone
	taskCancelled
)

const privateTaskSuffix = "-kubegate-run"

type delayedTask struct {
	d       *taskDelayer
	arm     *delayArm
	pub     *simulator.Task
	ref     types.ManagedObjectReference // public moref
	private types.ManagedObjectReference
	execute taskExecute
	delay   time.Duration

	mu     sync.Mutex
	state  int
	cancel chan struct{}
}

func parseTaskDelay(s string) (map[string]int, error) {
	m, err := parseMethodDelay(s)
	if err != nil {
		return nil, fmt.Errorf("%v", strings.Replace(err.Error(), "-method-delay", "-task-delay", 1))
	}
	for name := range m {
		if name == "" {
			return nil, fmt.Errorf("invalid -task-delay entry with an empty method name")
		}
	}
	return m, nil
}

func newTaskDelayer(delays map[string]int, jitter float64) *taskDelayer {
	if delays == nil {
		delays = map[string]int{}
	}
	return &taskDelayer{
		self:   types.ManagedObjectReference{Type: "KubegateTaskDelay", Value: "kubegate-task-delay"},
		delays: delays,
		jitter: jitter,
		armed:  map[uint64]*delayArm{},
		tasks:  map[types.ManagedObjectReference]*delayedTask{},
	}
}

// install registers the Registry handler (also without -task-delay: CloneVM_Task's fix-ups
// wrap the clone task's work).
func (d *taskDelayer) install() {
	simulator.Map.AddHandler(d)
}

func (d *taskDelayer) active() bool { return d != nil && len(d.delays) > 0 }

// delayFor returns the configured delay (ms) of a method; 0 means "not delayed".
func (d *taskDelayer) delayFor(method string) int {
	if !d.active() || method == "" {
		return 0
	}
	if ms, ok := d.delays[method]; ok {
		return ms
	}
	if strings.HasSuffix(method, "_Task") {
		return d.delays["*"]
	}
	return 0
}

// copyDelays returns the delays for the ready file.
func (d *taskDelayer) copyDelays() map[string]int {
	out := map[string]int{}
	if d != nil {
		for k, v := range d.delays {
			out[k] = v
		}
	}
	return out
}

func (d *taskDelayer) describe() string {
	var parts []string
	for k, v := range d.delays {
		parts = append(parts, fmt.Sprintf("%s=%dms", k, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

// goid returns the current goroutine's id (from the "goroutine N [" stack header).
func goid() uint64 {
	var buf [64]byte
	n := runtime.Stack(buf[:], false)
	s := bytes.TrimPrefix(buf[:n], []byte("goroutine "))
	if i := bytes.IndexByte(s, ' '); i > 0 {
		id, _ := strconv.ParseUint(string(s[:i]), 10, 64)
		return id
	}
	return 0
}

// arm marks the first task that the current goroutine creates: delayed by ms (if > 0) and
// wrapped by around (if set). The caller must disarm.
func (d *taskDelayer) arm(method string, this types.ManagedObjectReference, ms int,
	around func(taskExecute, *simulator.Task) (types.AnyType, types.BaseMethodFault)) *delayArm {
	a := &delayArm{method: method, this: this, delay: ms, around: around, gid: goid()}
	d.mu.Lock()
	d.armed[a.gid] = a
	d.mu.Unlock()
	return a
}

func (d *taskDelayer) disarm(a *delayArm) {
	d.mu.Lock()
	if d.armed[a.gid] == a {
		delete(d.armed, a.gid)
	}
	d.mu.Unlock()
}

// rewrite replaces the private task moref that vcsim put into the response with the public one.
func (a *delayArm) rewrite(body []byte) []byte {
	if a.task == nil {
		return body
	}
	return bytes.Replace(body, []byte(">"+a.task.private.Value+"<"), []byte(">"+a.task.ref.Value+"<"), -1)
}

// --- simulator.RegisterObject ---

func (d *taskDelayer) Reference() types.ManagedObjectReference { return d.self }

func (d *taskDelayer) PutObject(obj mo.Reference) {
	t, ok := obj.(*simulator.Task)
	if !ok {
		return
	}
	d.mu.Lock()
	if len(d.armed) == 0 {
		d.mu.Unlock()
		return
	}
	d.mu.Unlock()
	gid := goid()
	d.mu.Lock()
	a := d.armed[gid]
	if a == nil || a.claimed {
		d.mu.Unlock()
		return
	}
	a.claimed = true
	d.mu.Unlock()

	// CreateTask calls Map.Put before returning the task, so Run has not been called yet.
	orig := t.Execute
	if orig == nil {
		return
	}
	work := orig
	if a.around != nil {
		work = func(run *simulator.Task) (types.AnyType, types.BaseMethodFault) { return a.around(orig, run) }
	}
	if a.delay <= 0 {
		t.Execute = work
		return
	}
	t.Execute = func(run *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if run != t {
			return work(run)
		}
		return d.detach(a, t, work)
	}
}

func (d *taskDelayer) UpdateObject(mo.Reference, []types.PropertyChange) {}

func (d *taskDelayer) RemoveObject(types.ManagedObjectReference) {}

// detach runs inside Task.Run (in the request's goroutine, with the method's _this locked).
func (d *taskDelayer) detach(a *delayArm, t *simulator.Task, execute taskExecute) (types.AnyType, types.BaseMethodFault) {
	ref := t.Self
	ms := a.delay
	if d.jitter > 0 {
		ms += int(rand.NormFloat64() * d.jitter * float64(ms))
	}
	if ms < 0 {
		ms = 0
	}
	dt := &delayedTask{
		d:       d,
		arm:     a,
		ref:     ref,
		private: types.ManagedObjectReference{Type: ref.Type, Value: ref.Value + privateTaskSuffix},
		execute: execute,
		delay:   time.Duration(ms) * time.Millisecond,
		state:   taskPending,
		cancel:  make(chan struct{}),
	}
	simulator.Map.WithLock(ref, func() {
		pub := &simulator.Task{Task: t.Task} // state running, startTime set by Run
		pub.Info.Cancelable = true
		pub.Info.Cancelled = false
		pub.Info.Progress = 0
		// vcsim's names ("CloneVm", "PowerOff") are no method names; clients that look at a
		// running task (pyVim's WaitForTask) resolve info.name as one.
		pub.Info.Name = a.method
		dt.pub = pub
		// From now on, Run's updates of t go to a moref no property filter knows.
		t.Self = dt.private
	})
	d.mu.Lock()
	d.tasks[ref] = dt
	a.task = dt
	d.mu.Unlock()

	simulator.Map.Put(dt.pub) // replaces t under the public moref
	dedupeRecentTask(ref)

	go dt.run()
	return nil, nil
}

// dedupeRecentTask undoes the second TaskManager.recentTask entry that Map.Put(pub) added.
func dedupeRecentTask(ref types.ManagedObjectReference) {
	si, ok := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
	if !ok || si.Content.TaskManager == nil {
		return
	}
	tm, ok := simulator.Map.Get(*si.Content.TaskManager).(*simulator.TaskManager)
	if !ok {
		return
	}
	tm.Lock()
	defer tm.Unlock()
	seen := false
	recent := make([]types.ManagedObjectReference, 0, len(tm.RecentTask))
	for _, r := range tm.RecentTask {
		if r == ref {
			if seen {
				continue
			}
			seen = true
		}
		recent = append(recent, r)
	}
	if len(recent) != len(tm.RecentTask) {
		simulator.Map.Update(tm, []types.PropertyChange{{Name: "recentTask", Val: recent}})
	}
}

// update applies changes to the public task with its lock held; Map.Update wakes up
// WaitForUpdates(Ex) callers.
func (dt *delayedTask) update(changes []types.PropertyChange) {
	simulator.Map.WithLock(dt.ref, func() { simulator.Map.Update(dt.pub, changes) })
}

const progressSteps = 5

func (dt *delayedTask) run() {
	start := time.Now()
	for i := 1; i <= progressSteps; i++ {
		wait := time.Until(start.Add(dt.delay * time.Duration(i) / progressSteps))
		timer := time.NewTimer(wait)
		select {
		case <-timer.C:
		case <-dt.cancel:
			timer.Stop()
			return
		}
		if i < progressSteps {
			dt.mu.Lock()
			if dt.state == taskPending {
				dt.update([]types.PropertyChange{{Name: "info.progress", Val: int32(100 * i / progressSteps)}})
			}
			dt.mu.Unlock()
		}
	}

	dt.mu.Lock()
	if dt.state != taskPending {
		dt.mu.Unlock()
		return
	}
	dt.state = taskExecuting
	dt.mu.Unlock()

	res, fault := dt.executeNow()

	now := time.Now()
	state := types.TaskInfoStateSuccess
	var lfault interface{}
	if fault != nil {
		state = types.TaskInfoStateError
		lfault = types.LocalizedMethodFault{Fault: fault, LocalizedMessage: fmt.Sprintf("%T", fault)}
	}
	changes := []types.PropertyChange{
		{Name: "info.completeTime", Val: now},
		{Name: "info.state", Val: state},
		{Name: "info.result", Val: res},
		{Name: "info.error", Val: lfault},
	}
	if fault == nil {
		changes = append(changes, types.PropertyChange{Name: "info.progress", Val: int32(100)})
	}
	dt.mu.Lock()
	dt.update(changes)
	dt.state = taskDone
	dt.mu.Unlock()
}

// executeNow runs the method's real work as the dispatcher would have: with its _this locked.
func (dt *delayedTask) executeNow() (res types.AnyType, fault types.BaseMethodFault) {
	a := dt.arm
	lock := a.this
	if lock.Value == "" && dt.pub.Info.Entity != nil {
		lock = *dt.pub.Info.Entity
	}
	if x := catch(func() { simulator.Map.WithLock(lock, func() { res, fault = dt.execute(dt.pub) }) }); x != nil {
		log.Printf("task-delay: %s %s (%s) panicked: %v", a.method, a.this, dt.ref, x)
		res, fault = nil, &types.SystemError{Reason: fmt.Sprint(x)}
	}
	if a.after != nil {
		if x := catch(func() { a.after(res, fault) }); x != nil {
			log.Printf("task-delay: %s %s (%s): after: %v", a.method, a.this, dt.ref, x)
		}
	}
	return res, fault
}

// catch runs f and returns what it panicked with (the task goroutines must not crash vcsim).
func catch(f func()) (x interface{}) {
	defer func() { x = recover() }()
	f()
	return nil
}

// owns tells whether ref is a delayed task.
func (d *taskDelayer) owns(ref types.ManagedObjectReference) bool {
	if !d.active() {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.tasks[ref] != nil
}

// cancelTask implements Task.CancelTask for a delayed task: before its work has started, the
// task ends in error with RequestCanceled (info.cancelled = true) and the work is never done.
func (d *taskDelayer) cancelTask(ref types.ManagedObjectReference) (string, types.BaseMethodFault) {
	d.mu.Lock()
	dt := d.tasks[ref]
	d.mu.Unlock()
	if dt == nil {
		return "", &types.ManagedObjectNotFound{Obj: ref}
	}
	dt.mu.Lock()
	defer dt.mu.Unlock()
	switch dt.state {
	case taskPending:
		dt.state = taskCancelled
		close(dt.cancel)
		dt.update([]types.PropertyChange{
			{Name: "info.cancelled", Val: true},
			{Name: "info.completeTime", Val: time.Now()},
			{Name: "info.state", Val: types.TaskInfoStateError},
			{Name: "info.error", Val: types.LocalizedMethodFault{
				Fault:            &types.RequestCanceled{},
				LocalizedMessage: "The task was canceled by a user.",
			}},
		})
		return "", nil
	case taskExecuting:
		return "the task is already completing and can no longer be canceled", &types.InvalidState{}
	case taskCancelled:
		return "the task was already canceled", &types.InvalidState{}
	default:
		return "the task has already completed", &types.InvalidState{}
	}
}
