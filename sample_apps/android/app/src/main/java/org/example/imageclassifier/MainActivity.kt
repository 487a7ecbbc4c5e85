package org.example.imageclassifier

import android.content.ActivityNotFoundException
import android.content.pm.PackageManager
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.graphics.Matrix
import android.net.Uri
import android.os.Bundle
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.core.view.isVisible
import androidx.exifinterface.media.ExifInterface
import androidx.lifecycle.lifecycleScope
import java.text.NumberFormat
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import org.example.imageclassifier.databinding.ActivityMainBinding

class MainActivity : AppCompatActivity() {

    private lateinit var binding: ActivityMainBinding
    private lateinit var classifier: Classifier

    // The system photo picker: it needs no storage permission.
    private val pickPhoto =
        registerForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
            if (uri != null) classifyPhoto { decodeUpright(uri) }
        }

    // The camera app returns a small bitmap, which is plenty for a classifier's input.
    private val takePhoto =
        registerForActivityResult(ActivityResultContracts.TakePicturePreview()) { bitmap ->
            if (bitmap != null) classifyPhoto { bitmap.toArgb8888() }
        }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        binding = ActivityMainBinding.inflate(layoutInflater)
        setContentView(binding.root)
        classifier = Classifier(this)

        binding.choosePhoto.setOnClickListener {
            pickPhoto.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly))
        }
        binding.takePhoto.isVisible = packageManager.hasSystemFeature(PackageManager.FEATURE_CAMERA_ANY)
        binding.takePhoto.setOnClickListener {
            try {
                takePhoto.launch(null)
            } catch (e: ActivityNotFoundException) {
                binding.results.setText(R.string.no_camera_app)
            }
        }

        lifecycleScope.launch {
            val loaded = withContext(Dispatchers.Default) { runCatching { classifier.load() } }
            loaded.onSuccess { installed ->
                if (installed) {
                    binding.results.setText(R.string.pick_a_photo)
                    setButtonsEnabled(true)
                } else {
                    binding.results.text = Classifier.NO_MODEL_MESSAGE
                }
            }.onFailure { error ->
                binding.results.text = getString(R.string.model_failed, error.message)
            }
        }
    }

    override fun onDestroy() {
        classifier.close()
        super.onDestroy()
    }

    /** Shows the photo and its top 3 labels; decoding and classifying run off the main thread. */
    private fun classifyPhoto(decode: () -> Bitmap?) {
        setButtonsEnabled(false)
        binding.results.setText(R.string.classifying)
        lifecycleScope.launch {
            val bitmap = withContext(Dispatchers.IO) { runCatching(decode).getOrNull() }
            if (bitmap == null) {
                binding.results.setText(R.string.unreadable_photo)
            } else {
                binding.photo.setImageBitmap(bitmap)
                val predictions = withContext(Dispatchers.Default) {
                    runCatching { classifier.classify(bitmap) }
                }
                binding.results.text = predictions.fold(
                    onSuccess = ::describe,
                    onFailure = { it.message ?: it.toString() },
                )
            }
            setButtonsEnabled(true)
        }
    }

    private fun describe(predictions: List<Prediction>): String {
        if (predictions.isEmpty()) return getString(R.string.no_labels)
        val percent = NumberFormat.getPercentInstance().apply {
            minimumFractionDigits = 1
            maximumFractionDigits = 1
        }
        return predictions.joinToString("\n") { "${it.label}   ${percent.format(it.score)}" }
    }

    private fun setButtonsEnabled(enabled: Boolean) {
        binding.choosePhoto.isEnabled = enabled
        binding.takePhoto.isEnabled = enabled
    }

    /** Decodes [uri] into an upright ARGB_8888 bitmap, downsampled to about [MAX_SIDE] pixels. */
    private fun decodeUpright(uri: Uri): Bitmap? {
        val bounds = BitmapFactory.Options().apply { inJustDecodeBounds = true }
        contentResolver.openInputStream(uri)?.use { BitmapFactory.decodeStream(it, null, bounds) }
        if (bounds.outWidth <= 0 || bounds.outHeight <= 0) return null

        // Large photos are decoded at a fraction of their size: the model's input is far smaller.
        var sampleSize = 1
        while (maxOf(bounds.outWidth, bounds.outHeight) / (sampleSize * 2) >= MAX_SIDE) sampleSize *= 2
        val options = BitmapFactory.Options().apply {
            inSampleSize = sampleSize
            inPreferredConfig = Bitmap.Config.ARGB_8888
        }
        val bitmap = contentResolver.openInputStream(uri)
            ?.use { BitmapFactory.decodeStream(it, null, options) } ?: return null

        // BitmapFactory ignores the EXIF orientation, so apply it: the model expects upright photos.
        val exif = runCatching { contentResolver.openInputStream(uri)?.use { ExifInterface(it) } }.getOrNull()
            ?: return bitmap.toArgb8888()
        val matrix = Matrix().apply {
            setRotate(exif.rotationDegrees.toFloat())
            if (exif.isFlipped) postScale(-1f, 1f)
        }
        if (matrix.isIdentity) return bitmap.toArgb8888()
        return Bitmap.createBitmap(bitmap, 0, 0, bitmap.width, bitmap.height, matrix, true).toArgb8888()
    }

    private companion object {
        const val MAX_SIDE = 1024
    }
}

/** MediaPipe's BitmapImageBuilder needs ARGB_8888 pixels. */
private fun Bitmap.toArgb8888(): Bitmap =
    if (config == Bitmap.Config.ARGB_8888) this else copy(Bitmap.Config.ARGB_8888, false)
