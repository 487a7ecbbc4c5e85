package org.example.imageclassifier

import android.content.Context
import android.graphics.Bitmap
import com.google.mediapipe.framework.image.BitmapImageBuilder
import com.google.mediapipe.tasks.core.BaseOptions
import com.google.mediapipe.tasks.vision.core.RunningMode
import com.google.mediapipe.tasks.vision.imageclassifier.ImageClassifier

/** One label predicted by the model and its score, from 0 to 1. */
data class Prediction(val label: String, val score: Float)

/**
 * Runs the TFLite classifier installed at assets/model.tflite with MediaPipe Tasks.
 *
 * MediaPipe's ImageClassifier reads the labels and the input normalisation from the model's
 * metadata (written by the toolchain) and resizes the photo to the model's input itself, so
 * nothing about the model is written here. Loading and closing are synchronized, so the
 * activity can close it while a background load or classification is still running.
 */
class Classifier(context: Context) : AutoCloseable {
    private val context = context.applicationContext
    private var classifier: ImageClassifier? = null
    private var closed = false

    /** Loads the model once; false when none is installed. Slow: call it off the main thread. */
    @Synchronized
    fun load(): Boolean {
        if (classifier != null) return true
        if (closed || context.assets.list("")?.contains("model.tflite") != true) return false
        val options = ImageClassifier.ImageClassifierOptions.builder()
            .setBaseOptions(BaseOptions.builder().setModelAssetPath("model.tflite").build())
            .setRunningMode(RunningMode.IMAGE)
            .setMaxResults(3)
            .build()
        classifier = ImageClassifier.createFromOptions(context, options)
        return true
    }

    /** The top 3 labels for an upright ARGB_8888 bitmap. Blocks while the model runs. */
    @Synchronized
    fun classify(bitmap: Bitmap): List<Prediction> {
        val classifier = classifier ?: return emptyList()
        val result = classifier.classify(BitmapImageBuilder(bitmap).build())
        val categories = result.classificationResult().classifications().firstOrNull()?.categories()
        return categories.orEmpty()
            .sortedByDescending { it.score() }
            .take(3)
            .map { category ->
                val name = category.displayName()
                Prediction(if (name.isNullOrEmpty()) category.categoryName() else name,
                           category.score())
            }
    }

    /** Frees the native model, after any running classification has finished. */
    @Synchronized
    override fun close() {
        closed = true
        classifier?.close()
        classifier = null
    }

    companion object {
        const val NO_MODEL_MESSAGE =
            "No model installed. Run: toolchain install --app android --from <build output folder>"
    }
}
